#!/usr/bin/env python3
"""Host-side helpers for tests/e2e/run.sh (standard library only).

  e2e_host.py qmp-stat QMP_SOCK NODE FIELD     print a query-blockstats counter
  e2e_host.py qmp QMP_SOCK COMMAND [JSON_ARGS] print the 'return' as JSON
  e2e_host.py send SOCK TEXT [LOG ACK [TIMEOUT]]  send one line to a unix
                                               socket (until ACK is in LOG)
  e2e_host.py connected SOCK                   exit 0 if a client is connected
                                               to the listening socket SOCK
  e2e_host.py extent IMG OFF LEN               print hole|data|mixed for a range
  e2e_host.py zero-outside IMG OFF:LEN ...     exit 1 (and say where) if the
                                               image has non-zero bytes outside
                                               the given ranges
"""
import json
import os
import socket
import sys
import time


def die(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


class Qmp:
    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        greeting = self._read()
        if "QMP" not in greeting:
            die(f"QMP: unexpected greeting {greeting!r}")
        self.execute("qmp_capabilities")

    def _read(self):
        # one JSON object per line; skip asynchronous events
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    die("QMP: connection closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            line = line.strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                die(f"QMP: not JSON: {line!r}")
            if "event" in msg:
                continue
            return msg

    def execute(self, cmd, args=None):
        req = {"execute": cmd}
        if args:
            req["arguments"] = args
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        resp = self._read()
        if "error" in resp:
            die(f"QMP {cmd}: error {resp['error']}")
        if "return" not in resp:
            die(f"QMP {cmd}: unexpected reply {resp!r}")
        return resp["return"]


def blockstats_for(entries, node):
    """The stats of NODE: the entry whose node-name matches (QSD's export
    BlockBackend carries its root node's name), else an entry whose parent
    matches, else the first entry."""
    for e in entries:
        if e.get("node-name") == node:
            return e.get("stats", {})
    for e in entries:
        p = e.get("parent") or {}
        if p.get("node-name") == node:
            return p.get("stats", {})
    if entries:
        return entries[0].get("stats", {})
    return None


def cmd_qmp_stat(path, node, field):
    q = Qmp(path)
    entries = q.execute("query-blockstats")
    stats = blockstats_for(entries, node)
    if stats is None or field not in stats:
        # some backends only report per node
        entries = q.execute("query-blockstats", {"query-nodes": True})
        stats = blockstats_for(entries, node)
    if stats is None or field not in stats:
        die(f"query-blockstats has no '{field}' for node {node}: {json.dumps(entries)[:400]}")
    print(stats[field])


def cmd_qmp(path, cmd, args=None):
    q = Qmp(path)
    print(json.dumps(q.execute(cmd, json.loads(args) if args else None)))


def cmd_send(path, text, logfile=None, ack=None, timeout="30"):
    """Send TEXT as one line. With LOGFILE and ACK: keep the connection open
    (QEMU drops what it has not yet passed to the UART when the client goes
    away) until ACK shows up in LOGFILE, sending again every 5 s."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    line = text.encode() + b"\n"
    s.sendall(line)
    if logfile and ack:
        deadline = time.monotonic() + float(timeout)
        last = time.monotonic()
        while True:
            with open(logfile, "rb") as f:
                if ack.encode() in f.read():
                    break
            now = time.monotonic()
            if now > deadline:
                s.close()
                die(f"the guest did not acknowledge '{text}' within {timeout} s")
            if now - last > 5:
                s.sendall(line)
                last = now
            time.sleep(0.1)
    s.close()


def cmd_connected(path):
    # /proc/net/unix: Num RefCount Protocol Flags Type St Inode Path
    # St 01 = unconnected/listening, 03 = connected. Accepted server-side
    # sockets carry the listening socket's path.
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == path and parts[5] == "03":
                sys.exit(0)
    sys.exit(1)


def cmd_extent(img, off, length):
    off, length = int(off), int(length)
    end = off + length
    fd = os.open(img, os.O_RDONLY)
    try:
        try:
            d = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            d = None  # ENXIO: no data after off
        if d is None or d >= end:
            print("hole")
            return
        h = os.lseek(fd, off, os.SEEK_HOLE)
        print("data" if d == off and h >= end else "mixed")
    finally:
        os.close(fd)


def cmd_zero_outside(img, ranges):
    rs = sorted((int(a), int(a) + int(b)) for a, b in (r.split(":") for r in ranges))
    size = os.path.getsize(img)
    pos = 0
    with open(img, "rb") as f:
        gaps = []
        for a, b in rs:
            if a > pos:
                gaps.append((pos, a))
            pos = max(pos, b)
        if pos < size:
            gaps.append((pos, size))
        for a, b in gaps:
            f.seek(a)
            p = a
            while p < b:
                chunk = f.read(min(1 << 20, b - p))
                if not chunk:
                    break
                stripped = chunk.lstrip(b"\0")
                if stripped:
                    die(f"non-zero byte at offset {p + len(chunk) - len(stripped)} "
                        f"(outside every written range)")
                p += len(chunk)


def main(argv):
    if len(argv) < 2:
        die(__doc__)
    c, a = argv[1], argv[2:]
    if c == "qmp-stat" and len(a) == 3:
        cmd_qmp_stat(*a)
    elif c == "qmp" and len(a) in (2, 3):
        cmd_qmp(*a)
    elif c == "send" and len(a) in (2, 4, 5):
        cmd_send(*a)
    elif c == "connected" and len(a) == 1:
        cmd_connected(*a)
    elif c == "extent" and len(a) == 3:
        cmd_extent(*a)
    elif c == "zero-outside" and len(a) >= 1:
        cmd_zero_outside(a[0], a[1:])
    else:
        die(__doc__)


if __name__ == "__main__":
    main(sys.argv)
