#!/usr/bin/env python3
"""Check that the daemon was linked in the order of bench/layout/blkstack.order.

    python3 bench/layout/check.py target/release/blkstack bench/layout/blkstack.order

Fails when the list no longer matches the binary's functions (renamed by a
dependency update or a new rustc: run `make layout`), or when
the linker did not follow it (build.rs found no lld, or the option was lost).
Either way the daemon still works; what is lost is the small resident code
that the benchmark's memory row measures.
"""
import subprocess
import sys

# At least this share of the listed functions must exist in the binary.
MIN_FOUND = 0.90
# At least this share of consecutive listed functions must lie in that order.
# (Not all: functions that share one section move together, e.g. the C
# start-up code's, and a name in .init stays there.)
MIN_IN_ORDER = 0.95


def text_section(binary):
    """(start, end) of the binary's .text section."""
    sections = subprocess.run(["readelf", "-SW", binary], capture_output=True, text=True, check=True)
    for line in sections.stdout.splitlines():
        fields = line.replace("[ ", "[").split()
        if len(fields) > 5 and fields[1] == ".text":
            start, size = int(fields[3], 16), int(fields[5], 16)
            return start, start + size
    sys.exit(f"{binary}: no .text section")


def main(binary, order_file):
    names = [l.strip() for l in open(order_file) if l.strip() and not l.startswith("#")]
    if not names:
        sys.exit(f"{order_file}: no functions listed")
    address = {}
    nm = subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True, check=True)
    for line in nm.stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[1] in ("t", "T"):
            address.setdefault(fields[2], int(fields[0], 16))
    found = [address[n] for n in names if n in address]
    share = len(found) / len(names)
    in_order = sum(1 for a, b in zip(found, found[1:]) if a < b)
    order_share = in_order / max(1, len(found) - 1)
    text = text_section(binary)
    in_text = [a for a in found if text[0] <= a < text[1]]
    span = (max(in_text) - min(in_text)) / 1024 if in_text else 0
    print(
        f"code layout: {len(found)} of {len(names)} listed functions in {binary} ({share:.0%}), "
        f"{order_share:.0%} of them in the listed order, spanning {span:.0f} of the {(text[1] - text[0]) / 1024:.0f} KiB of .text"
    )
    problems = []
    if share < MIN_FOUND:
        problems.append(
            f"only {share:.0%} of the functions in {order_file} exist in {binary}: "
            "the list is stale; run `make layout` and commit the new list"
        )
    elif order_share < MIN_IN_ORDER:
        problems.append(
            f"only {order_share:.0%} of the listed functions lie in the listed order: "
            "the linker did not use the list (see the warnings of `cargo build --release`, build.rs)"
        )
    for p in problems:
        print(f"code layout: FAIL: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: check.py BINARY ORDER_FILE")
    sys.exit(main(sys.argv[1], sys.argv[2]))
