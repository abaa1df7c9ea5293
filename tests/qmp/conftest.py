"""Fixtures for the QMP tests: a running `blkstack serve` with a monitor.

The daemon is started with qemu-storage-daemon's monitor options and waited
for through its systemd readiness notification (NOTIFY_SOCKET), not by
polling or sleeping.
"""

import asyncio
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

REPO = Path(__file__).resolve().parents[2]
BLKSTACK = os.environ.get("BLKSTACK", str(REPO / "target" / "release" / "blkstack"))
START_TIMEOUT = 30


class Daemon:
    """One `blkstack serve` process and its paths."""

    def __init__(self, tmp: Path):
        self.dir = tmp
        self.qmp_sock = str(tmp / "qmp.sock")
        self.proc = None

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def image(self, name: str, size: int) -> str:
        p = self.path(name)
        with open(p, "wb") as f:
            f.truncate(size)
        return p

    def start(self, *extra: str) -> None:
        notify_path = self.path("notify.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(START_TIMEOUT)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        args = [
            BLKSTACK, "serve",
            "--chardev", f"socket,id=m0,path={self.qmp_sock},server=on,wait=off",
            "--monitor", "chardev=m0",
            *extra,
        ]
        self.log = open(self.path("blkstack.log"), "wb")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            while True:
                msg = notify.recv(4096).decode()
                if "READY=1" in msg.split("\n"):
                    break
        except socket.timeout:
            self.proc.kill()
            raise AssertionError(f"blkstack did not become ready: {self.read_log()}")
        finally:
            notify.close()

    def read_log(self) -> str:
        return Path(self.path("blkstack.log")).read_text(errors="replace")

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.close()
        return rc


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    d.start()
    yield d
    rc = d.stop()
    assert rc == 0, f"blkstack exited with {rc}: {d.read_log()}"


def run(coro):
    """Runs one test coroutine on a fresh event loop."""
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


async def client(d: Daemon, name: str = "test") -> QMPClient:
    qmp = QMPClient(name)
    await qmp.connect(d.qmp_sock)
    return qmp
