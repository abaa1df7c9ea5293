"""blkstack's QMP monitor driven by QEMU's own client library (qemu.qmp),
by qemu-io over NBD, by libblkio (through `blkstack bench`), and by a raw
socket for what a well-behaved client never sends."""

import asyncio
import json
import os
import socket
import stat
import subprocess

import pytest
from qemu.qmp import ExecuteError

from conftest import BLKSTACK, client, run

MIB = 1 << 20


# --- helpers ---------------------------------------------------------------

class Raw:
    """A QMP connection over a plain socket, one JSON object per line."""

    def __init__(self, path: str):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(30)
        self.s.connect(path)
        self.buf = b""

    def line(self):
        """The next message, or None once the server closed the connection."""
        while b"\n" not in self.buf:
            try:
                data = self.s.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, data: bytes):
        self.s.sendall(data)

    def ask(self, obj):
        self.send((obj if isinstance(obj, str) else json.dumps(obj)).encode() + b"\n")
        return self.line()

    def negotiate(self):
        assert "QMP" in self.line()
        assert self.ask({"execute": "qmp_capabilities"}) == {"return": {}}
        return self

    def close(self):
        self.s.close()


async def expect_error(qmp, cmd, args, cls, desc=None):
    with pytest.raises(ExecuteError) as e:
        await qmp.execute(cmd, args)
    assert e.value.error_class == cls, str(e.value)
    if desc is not None:
        assert str(e.value) == desc
    return str(e.value)


async def export_del_once_unused(qmp, export_id, timeout=10.0):
    """block-export-del (safe mode) once the export has no client.

    A frontend that exits is noticed by the daemon a moment later, when its
    connection thread reads the end of the socket (QEMU's vhost-user server
    notices it in a coroutine the same way); until then the export is still
    in use and safe mode refuses. A management tool retries; so does this.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await qmp.execute("block-export-del", {"id": export_id})
        except ExecuteError as e:
            if "still in use" not in str(e) or asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.02)


async def add_raw_node(qmp, d, name="disk0", size=8 * MIB):
    img = d.image(f"{name}.img", size)
    await qmp.execute("blockdev-add", {
        "driver": "raw", "node-name": name,
        "file": {"driver": "file", "filename": img},
    })
    return img


async def nbd_export(qmp, d, node="disk0", name="disk", eid="nbd0"):
    sock = d.path("nbd.sock")
    await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    await qmp.execute("block-export-add", {
        "type": "nbd", "id": eid, "node-name": node, "name": name, "writable": True,
    })
    return f"nbd+unix:///{name}?socket={sock}"


def qemu_io(url, *cmds):
    args = ["qemu-io", "-f", "raw", url]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
    return r.stdout


def node_info(nodes, name):
    found = [n for n in nodes if n["node-name"] == name]
    assert len(found) == 1, nodes
    return found[0]


def stats_of(entries, name):
    found = [e for e in entries if e["node-name"] == name]
    assert len(found) == 1, entries
    return found[0]


# --- wire protocol ---------------------------------------------------------

def test_greeting_negotiation_and_socket_mode(daemon):
    mode = os.stat(daemon.qmp_sock).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    c = Raw(daemon.qmp_sock)
    greeting = c.line()
    ver = greeting["QMP"]["version"]
    assert set(ver["qemu"]) == {"major", "minor", "micro"}
    assert ver["package"].startswith("blkstack ")
    assert greeting["QMP"]["capabilities"] == []
    assert c.ask({"execute": "query-version", "id": 1}) == {
        "error": {"class": "CommandNotFound",
                  "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
        "id": 1}
    assert c.ask({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) == {
        "error": {"class": "GenericError", "desc": "Capability oob not available"}}
    assert c.ask({"execute": "qmp_capabilities", "id": "n"}) == {"return": {}, "id": "n"}
    assert c.ask({"execute": "qmp_capabilities"})["error"]["class"] == "CommandNotFound"
    assert c.ask({"execute": "query-version", "id": [1, {"x": None}]}) == {
        "return": ver, "id": [1, {"x": None}]}
    c.close()


def test_qemu_qmp_client_and_query_commands(daemon):
    async def t():
        qmp = await client(daemon)
        ver = await qmp.execute("query-version")
        assert ver["package"].startswith("blkstack ")
        names = {c["name"] for c in await qmp.execute("query-commands")}
        assert {"qmp_capabilities", "query-version", "query-commands", "quit",
                "blockdev-add", "blockdev-del", "query-named-block-nodes",
                "block-export-add", "block-export-del", "query-block-exports",
                "nbd-server-start", "nbd-server-stop", "query-blockstats",
                "block_resize"} <= names
        await qmp.disconnect()
    run(t())


def test_errors_have_qemus_classes_and_change_nothing(daemon):
    async def t():
        qmp = await client(daemon)
        await add_raw_node(qmp, daemon)
        before = await qmp.execute("query-named-block-nodes", {"flat": True})
        await expect_error(qmp, "no-such-command", None, "CommandNotFound",
                           "The command no-such-command has not been found")
        await expect_error(qmp, "block_resize", {"node-name": "disk0"}, "GenericError",
                           "Parameter 'size' is missing")
        await expect_error(qmp, "block_resize", {"node-name": "disk0", "size": "1G"},
                           "GenericError", "Invalid parameter type for 'size', expected: integer")
        await expect_error(qmp, "block_resize", {"node-name": "disk0", "size": MIB, "x": 1},
                           "GenericError", "Parameter 'x' is unexpected")
        await expect_error(qmp, "block_resize", {"node-name": "nope", "size": MIB},
                           "GenericError", "Cannot find device='' nor node-name='nope'")
        await expect_error(qmp, "blockdev-del", {}, "GenericError",
                           "Parameter 'node-name' is missing")
        await expect_error(qmp, "blockdev-del", {"node-name": 7}, "GenericError",
                           "Invalid parameter type for 'node-name', expected: string")
        await expect_error(qmp, "query-named-block-nodes", {"flat": "yes"}, "GenericError",
                           "Invalid parameter type for 'flat', expected: boolean")
        await expect_error(qmp, "block-export-del", {"id": "nope"}, "GenericError",
                           "Export 'nope' is not found")
        await expect_error(qmp, "block-export-add",
                           {"type": "nbd", "id": "e0", "node-name": "disk0"}, "GenericError")
        await expect_error(qmp, "blockdev-add", {
            "driver": "raw", "node-name": "other",
            "file": {"driver": "file", "filename": daemon.path("missing.img")}}, "GenericError")
        await expect_error(qmp, "blockdev-add", {"driver": "raw", "node-name": "disk0",
                                                 "file": "disk0"}, "GenericError")
        await expect_error(qmp, "nbd-server-start",
                           {"addr": {"type": "unix", "data": {"path": daemon.path("n.sock"), "x": 1}}},
                           "GenericError", "Parameter 'addr.data.x' is unexpected")
        assert await qmp.execute("query-named-block-nodes", {"flat": True}) == before
        assert await qmp.execute("query-block-exports") == []
        assert os.path.getsize(daemon.path("disk0.img")) == 8 * MIB
        await expect_error(qmp, "nbd-server-stop", None, "GenericError")  # never started
        await qmp.disconnect()
    run(t())


def test_malformed_json_gets_an_error_and_the_connection_survives(daemon):
    async def t():
        other = await client(daemon, "other")
        c = Raw(daemon.qmp_sock).negotiate()
        r = c.ask('{"execute": }')
        assert r["error"]["class"] == "GenericError"
        assert r["error"]["desc"].startswith("JSON parse error")
        assert c.ask("garbage")["error"]["desc"].startswith("JSON parse error")
        assert c.ask("[1, 2]")["error"]["desc"] == "QMP input must be a JSON object"
        assert c.ask({"execute": 1, "id": 4}) == {
            "error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"},
            "id": 4}
        assert c.ask({"execute": "query-version", "bogus": 1})["error"]["desc"] == \
            "QMP input member 'bogus' is unexpected"
        # Two messages in one write, one message over two writes.
        c.send(b'{"execute": "query-version", "id": 1}{"execute": "query-version",')
        assert c.line()["id"] == 1
        c.send(b' "id": 2}\n')
        assert c.line()["id"] == 2
        assert "qemu" in await other.execute("query-version")
        c.close()
        await other.disconnect()
    run(t())


def test_oversized_message_closes_only_that_client(daemon):
    async def t():
        other = await client(daemon, "other")
        c = Raw(daemon.qmp_sock).negotiate()
        payload = b'{"execute": "query-version", "arguments": {"x": "' + b"a" * (8 * MIB) + b'"}}\n'
        try:
            c.send(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading at its limit
        r = c.line()
        if r is not None:
            assert r["error"]["class"] == "GenericError", r
            assert c.line() is None
        c.close()
        assert "qemu" in await other.execute("query-version")
        late = Raw(daemon.qmp_sock).negotiate()  # and new clients are served
        assert "return" in late.ask({"execute": "query-version"})
        late.close()
        await other.disconnect()
    run(t())


# --- block nodes, NBD, statistics -----------------------------------------

def test_blockdev_add_and_query_named_block_nodes(daemon):
    async def t():
        qmp = await client(daemon)
        img = await add_raw_node(qmp, daemon)
        nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
        assert len(nodes) == 2  # the raw node and its implicit file node
        raw = node_info(nodes, "disk0")
        assert raw["drv"] == "raw" and raw["ro"] is False and raw["file"] == img
        assert raw["image"]["virtual-size"] == 8 * MIB
        assert raw["image"]["format"] == "raw" and raw["image"]["filename"] == img
        assert raw["cache"] == {"writeback": True, "direct": False, "no-flush": False}
        for key in ("encrypted", "detect_zeroes", "bps", "bps_rd", "bps_wr", "iops",
                    "iops_rd", "iops_wr", "write_threshold", "backing_file_depth"):
            assert key in raw, key
        implicit = [n for n in nodes if n["node-name"] != "disk0"][0]
        assert implicit["drv"] == "file" and implicit["node-name"].startswith("#block")
        await expect_error(qmp, "blockdev-add", {
            "driver": "raw", "node-name": "disk0",
            "file": {"driver": "file", "filename": img}}, "GenericError")
        await qmp.disconnect()
    run(t())


def test_nbd_export_and_blockstats_match_client_io(daemon):
    async def t():
        qmp = await client(daemon)
        await add_raw_node(qmp, daemon)
        url = await nbd_export(qmp, daemon)
        assert await qmp.execute("query-block-exports") == [
            {"id": "nbd0", "type": "nbd", "node-name": "disk0", "shutting-down": False}]
        before = stats_of(await qmp.execute("query-blockstats"), "disk0")["stats"]
        assert before["wr_bytes"] == 0 and before["rd_bytes"] == 0
        qemu_io(url, "write -P 0xab 0 1M", "read -P 0xab 0 1M", "write -P 0xcd 2M 64k")
        entries = await qmp.execute("query-blockstats")
        assert [e["node-name"] for e in entries] == ["disk0"]  # the roots
        s = entries[0]["stats"]
        assert s["wr_bytes"] == MIB + 64 * 1024
        assert s["wr_operations"] == 2
        assert s["rd_bytes"] == MIB and s["rd_operations"] == 1
        assert s["wr_highest_offset"] == 2 * MIB + 64 * 1024
        assert s["failed_wr_operations"] == 0 and s["invalid_rd_operations"] == 0
        assert s["flush_operations"] >= 1  # qemu-io flushes before it exits
        assert s["wr_total_time_ns"] > 0 and "idle_time_ns" in s
        parent = entries[0]["parent"]
        assert parent["node-name"].startswith("#block")
        assert parent["stats"]["wr_bytes"] == MIB + 64 * 1024
        everything = await qmp.execute("query-blockstats", {"query-nodes": True})
        assert {e["node-name"] for e in everything} == {"disk0", parent["node-name"]}
        with open(daemon.path("disk0.img"), "rb") as f:
            assert f.read(MIB) == b"\xab" * MIB
        await qmp.disconnect()
    run(t())


def test_blockdev_del_refused_while_exported_then_export_deleted_event(daemon):
    async def t():
        qmp = await client(daemon)
        watcher = await client(daemon, "watcher")
        await add_raw_node(qmp, daemon)
        await nbd_export(qmp, daemon)
        await expect_error(qmp, "blockdev-del", {"node-name": "disk0"}, "GenericError")
        assert len(await qmp.execute("query-named-block-nodes")) == 2
        await expect_error(qmp, "block-export-del", {"id": "nbd0", "mode": "soft"}, "GenericError",
                           "Parameter 'mode' does not accept value 'soft'")
        with qmp.listener("BLOCK_EXPORT_DELETED") as mine, \
                watcher.listener("BLOCK_EXPORT_DELETED") as theirs:
            await qmp.execute("block-export-del", {"id": "nbd0"})
            ev = await mine.get()
            assert ev["data"] == {"id": "nbd0"}
            assert set(ev["timestamp"]) == {"seconds", "microseconds"}
            assert (await theirs.get())["data"] == {"id": "nbd0"}
        assert await qmp.execute("query-block-exports") == []
        await qmp.execute("blockdev-del", {"node-name": "disk0"})
        assert await qmp.execute("query-named-block-nodes") == []
        await qmp.execute("nbd-server-stop")
        await qmp.disconnect()
        await watcher.disconnect()
    run(t())


def test_nbd_server_stop_deletes_its_exports(daemon):
    async def t():
        qmp = await client(daemon)
        await add_raw_node(qmp, daemon)
        url = await nbd_export(qmp, daemon)
        qemu_io(url, "write -P 0x22 0 64k")
        with qmp.listener("BLOCK_EXPORT_DELETED") as ev:
            await qmp.execute("nbd-server-stop")
            assert (await ev.get())["data"] == {"id": "nbd0"}
        assert await qmp.execute("query-block-exports") == []
        await expect_error(qmp, "nbd-server-stop", {}, "GenericError")
        assert not os.path.exists(daemon.path("nbd.sock"))
        # The node is free again.
        await qmp.execute("blockdev-del", {"node-name": "disk0"})
        await qmp.disconnect()
    run(t())


def test_block_resize_is_seen_by_nbd_clients(daemon):
    async def t():
        qmp = await client(daemon)
        await add_raw_node(qmp, daemon)
        url = await nbd_export(qmp, daemon)
        await expect_error(qmp, "block_resize", {"node-name": "disk0", "size": -1}, "GenericError",
                           "Parameter 'size' expects a >0 size")
        await qmp.execute("block_resize", {"node-name": "disk0", "size": 16 * MIB})
        raw = node_info(await qmp.execute("query-named-block-nodes", {"flat": True}), "disk0")
        assert raw["image"]["virtual-size"] == 16 * MIB
        assert os.path.getsize(daemon.path("disk0.img")) == 16 * MIB
        # A new NBD connection sees the new size and can use the new space.
        assert "16 MiB" in qemu_io(url, "length")
        qemu_io(url, "write -P 0x11 15M 1M", "read -P 0x11 15M 1M")
        await qmp.disconnect()
    run(t())


# --- vhost-user-blk --------------------------------------------------------

def blkio_capacity(sock: str) -> int:
    """The capacity a libblkio virtio-blk-vhost-user client sees."""
    r = subprocess.run([BLKSTACK, "bench", "--socket", sock, "--seconds", "0.1", "--iodepth", "1",
                        "--json", "-", "-q"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)["device"]["capacity"]


def test_vhost_user_blk_export_and_resize(daemon):
    async def t():
        qmp = await client(daemon)
        await add_raw_node(qmp, daemon)
        sock = daemon.path("vhost.sock")
        await expect_error(qmp, "block-export-add", {
            "type": "vhost-user-blk", "id": "vu0", "node-name": "disk0",
            "addr": {"type": "unix", "path": sock}, "num-queues": "two"}, "GenericError")
        await qmp.execute("block-export-add", {
            "type": "vhost-user-blk", "id": "vu0", "node-name": "disk0",
            "addr": {"type": "unix", "path": sock}, "writable": True})
        assert await qmp.execute("query-block-exports") == [
            {"id": "vu0", "type": "vhost-user-blk", "node-name": "disk0", "shutting-down": False}]
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        assert blkio_capacity(sock) == 8 * MIB
        await qmp.execute("block_resize", {"node-name": "disk0", "size": 32 * MIB})
        assert blkio_capacity(sock) == 32 * MIB
        s = stats_of(await qmp.execute("query-blockstats"), "disk0")["stats"]
        assert s["rd_operations"] > 0  # the benchmark's reads went through the node
        await expect_error(qmp, "blockdev-del", {"node-name": "disk0"}, "GenericError")
        with qmp.listener("BLOCK_EXPORT_DELETED") as events:
            # The benchmark client above has exited; wait until the daemon saw it go.
            await export_del_once_unused(qmp, "vu0")
            assert (await events.get())["data"] == {"id": "vu0"}
        await qmp.execute("blockdev-del", {"node-name": "disk0"})
        await qmp.disconnect()
    run(t())


# --- several clients, quit -------------------------------------------------

def test_several_clients_at_once(daemon):
    async def t():
        clients = [await client(daemon, f"c{i}") for i in range(4)]
        for i, c in enumerate(clients):
            await add_raw_node(c, daemon, name=f"n{i}", size=MIB)
        for c in clients:
            names = {n["node-name"] for n in await c.execute("query-named-block-nodes")}
            assert {"n0", "n1", "n2", "n3"} <= names
        for c in clients:
            await c.disconnect()
    run(t())


def test_quit_answers_then_exits(daemon):
    async def t():
        qmp = await client(daemon)
        await add_raw_node(qmp, daemon)
        assert await qmp.execute("quit") == {}
        try:
            await qmp.disconnect()
        except EOFError:
            pass  # the daemon closed the connection as it exited, as QEMU does
    run(t())
    assert daemon.proc.wait(timeout=30) == 0
    assert not os.path.exists(daemon.qmp_sock)
