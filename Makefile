# blkstack — the two commands: `make run` and `make test`.
CARGO ?= cargo
BIN := target/release/blkstack
IMG ?= blkstack-default.img
SOCK ?= $(CURDIR)/blkstack.sock
QUEUES ?= 2

.PHONY: all build run deps test test-unit test-qmp test-e2e bench layout clean

all: build

build:
	$(CARGO) build --release --locked

# Serve a sparse 1 GiB image over vhost-user-blk at ./blkstack.sock.
run: build
	@test -f $(IMG) || truncate -s 1G $(IMG)
	@echo "blkstack: serving $(IMG) over vhost-user-blk at $(SOCK) ($(QUEUES) queues)"
	@echo
	@echo "Attach with QEMU (guest RAM must be shared with the backend; -accel tcg where there is no KVM):"
	@echo "  qemu-system-x86_64 -accel kvm -m 1G \\"
	@echo "    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\"
	@echo "    -chardev socket,id=blk0,path=$(SOCK),reconnect-ms=1000 \\"
	@echo "    -device vhost-user-blk-pci,chardev=blk0,num-queues=$(QUEUES) ..."
	@echo
	@echo "Attach with cloud-hypervisor:"
	@echo "  cloud-hypervisor --memory size=1G,shared=on \\"
	@echo "    --disk vhost_user=true,socket=$(SOCK),num_queues=$(QUEUES),queue_size=256 ..."
	@echo
	@echo "Stop with Ctrl-C (drains in-flight requests and flushes)."
	exec $(BIN) serve \
	  --blockdev driver=file,node-name=disk0,filename=$(IMG) \
	  --export type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,addr.path=$(SOCK),writable=on,num-queues=$(QUEUES)

deps:
	bash scripts/install-deps.sh

# Everything: unit and integration tests (libblkio, qemu-io/qemu-img over NBD,
# the bench smoke run), the QMP tests with qemu.qmp, and the guest tests
# against qemu-storage-daemon (cross-check) and blkstack.
test: deps build
	python3 bench/layout/check.py $(BIN) bench/layout/blkstack.order
	$(CARGO) test --profile test-release --locked
	bash tests/qmp/run.sh
	bash tests/e2e/setup.sh
	bash tests/e2e/run.sh --backend qsd
	bash tests/e2e/run.sh --backend blkstack --blkstack $(BIN)

test-unit: build
	python3 bench/layout/check.py $(BIN) bench/layout/blkstack.order
	$(CARGO) test --profile test-release --locked

test-qmp: build
	bash tests/qmp/run.sh

test-e2e: build
	bash tests/e2e/setup.sh
	bash tests/e2e/run.sh --backend qsd
	bash tests/e2e/run.sh --backend blkstack --blkstack $(BIN)

bench: build
	bash bench/compare.sh

# Regenerate bench/layout/blkstack.order (the daemon's code layout, see
# build.rs) and relink with it.
layout: deps
	bash bench/layout/train.sh
	$(CARGO) build --release --locked

clean:
	$(CARGO) clean
	rm -f $(IMG) blkstack.sock
