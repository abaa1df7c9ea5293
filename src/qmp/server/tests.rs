//! Socket-level tests of the server with a stand-in backend.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::{Server, MAX_MESSAGE, QUEUE_LEN};
use crate::qmp::session::tests::Echo;

struct Conn {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Conn {
    fn open(path: &PathBuf) -> Conn {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        Conn { w: s.try_clone().expect("clone"), r: BufReader::new(s) }
    }

    /// The next line; `None` once the server closed the connection (a close
    /// with unread input reaches a unix socket peer as ECONNRESET).
    fn line(&mut self) -> Option<Value> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(0) => None,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Ok(_) => {
                assert!(l.ends_with("\r\n"), "{l:?}");
                Some(serde_json::from_str(&l).expect("a JSON line"))
            }
            Err(e) => panic!("read: {e}"),
        }
    }

    fn send(&mut self, text: &str) {
        self.w.write_all(text.as_bytes()).expect("write");
    }

    fn ask(&mut self, text: &str) -> Value {
        self.send(text);
        self.line().expect("a reply")
    }

    fn negotiated(path: &PathBuf) -> Conn {
        let mut c = Conn::open(path);
        assert!(c.line().expect("greeting")["QMP"].is_object());
        assert_eq!(c.ask(r#"{"execute": "qmp_capabilities"}"#), json!({"return": {}}));
        c
    }

    /// Reads until EOF; returns how many lines came first.
    fn until_eof(&mut self) -> usize {
        let mut n = 0;
        while self.line().is_some() {
            n += 1;
        }
        n
    }
}

fn start() -> (tempfile::TempDir, PathBuf, Arc<Echo>, Server) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("qmp.sock");
    let backend = Arc::new(Echo::default());
    let server = Server::start(&path, false, backend.clone()).expect("start");
    (dir, path, backend, server)
}

#[test]
fn greeting_commands_and_socket_mode() {
    let (_dir, path, _b, server) = start();
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let mut c = Conn::open(&path);
    let g = c.line().unwrap();
    assert_eq!(g["QMP"]["capabilities"], json!([]));
    assert_eq!(c.ask(r#"{"execute": "echo", "id": 1}"#)["error"]["class"], "CommandNotFound");
    c.send("{\"execute\": \"qmp_capabilities\"}{\"execute\": \"echo\",");
    assert_eq!(c.line().unwrap(), json!({"return": {}}));
    assert_eq!(c.ask(" \"arguments\": {\"a\": 1}, \"id\": 2}\n"), json!({"return": {"a": 1}, "id": 2}));
    server.stop();
    assert!(c.line().is_none(), "stop closes the connection");
    assert!(!path.exists(), "stop removes the socket");
}

#[test]
fn stale_sockets_are_replaced_other_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let s = Server::start(&path, false, Arc::new(Echo::default())).expect("replaces a stale socket");
    Conn::negotiated(&path);
    s.stop();
    std::fs::write(&path, b"data").unwrap();
    let err = Server::start(&path, false, Arc::new(Echo::default())).err().expect("refused");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 1, "no private directory left behind: {leftovers:?}");
}

#[test]
fn events_reach_negotiated_clients_only() {
    let (_dir, path, _b, _server) = start();
    let mut a = Conn::negotiated(&path);
    let mut b = Conn::negotiated(&path);
    let mut fresh = Conn::open(&path);
    fresh.line().unwrap();
    // An event raised by a command may come before or after its reply.
    a.send(r#"{"execute": "emit", "id": 7}"#);
    let (x, y) = (a.line().unwrap(), a.line().unwrap());
    let (reply, event) = if x.get("event").is_some() { (y, x) } else { (x, y) };
    assert_eq!(reply, json!({"return": {}, "id": 7}));
    assert_eq!(event["event"], "TEST_EVENT");
    assert_eq!(b.line().unwrap()["event"], "TEST_EVENT");
    // The un-negotiated client got nothing: its next line is its own reply.
    assert_eq!(fresh.ask(r#"{"execute": "qmp_capabilities"}"#), json!({"return": {}}));
}

#[test]
fn malformed_json_is_answered_and_the_stream_resyncs() {
    let (_dir, path, _b, _server) = start();
    let mut c = Conn::negotiated(&path);
    let v = c.ask("{\"execute\": }\n");
    assert_eq!(v["error"]["class"], "GenericError");
    assert!(v["error"]["desc"].as_str().unwrap().starts_with("JSON parse error, "), "{v}");
    assert_eq!(c.ask("foo\n")["error"]["desc"], "JSON parse error, invalid keyword 'foo'");
    assert_eq!(c.ask("[1]")["error"]["desc"], "QMP input must be a JSON object");
    assert_eq!(c.ask(r#"{"execute": "echo", "id": 3}"#), json!({"return": {}, "id": 3}));
}

#[test]
fn an_oversized_message_closes_only_that_client() {
    let (_dir, path, _b, server) = start();
    let mut big = Conn::negotiated(&path);
    let mut other = Conn::negotiated(&path);
    let writer = {
        let mut w = big.w.try_clone().unwrap();
        std::thread::spawn(move || {
            // The server stops reading after the limit; ignore EPIPE then.
            let _ = w.write_all(b"{\"execute\": \"echo\", \"arguments\": {\"a\": \"");
            let chunk = vec![b'x'; 1 << 16];
            for _ in 0..(MAX_MESSAGE / chunk.len() + 2) {
                if w.write_all(&chunk).is_err() {
                    break;
                }
            }
        })
    };
    let v = big.line().expect("an error before the close");
    assert!(v["error"]["desc"].as_str().unwrap().contains("larger than"), "{v}");
    assert!(big.line().is_none());
    writer.join().unwrap();
    assert_eq!(other.ask(r#"{"execute": "echo", "id": 1}"#), json!({"return": {}, "id": 1}));
    assert_eq!(server.clients(), 1);
}

#[test]
fn quit_is_answered_before_the_daemon_is_told() {
    let (_dir, path, b, _server) = start();
    let mut c = Conn::negotiated(&path);
    assert_eq!(c.ask(r#"{"execute": "quit", "id": "q"}"#), json!({"return": {}, "id": "q"}));
    // The reply is flushed first, then the backend hears of it.
    assert_eq!(c.ask(r#"{"execute": "echo"}"#), json!({"return": {}}));
    assert_eq!(b.quits.load(Ordering::SeqCst), 1);
}

#[test]
fn a_client_that_does_not_read_is_dropped_not_waited_for() {
    let (_dir, path, b, server) = start();
    let mut slow = Conn::negotiated(&path);
    let mut fast = Conn::negotiated(&path);
    // Enough events to fill the slow client's socket buffer and its queue,
    // in batches the fast client reads before the next one is sent.
    let (batch, batches) = (QUEUE_LEN / 4, 256);
    let total = batch * batches;
    for _ in 0..batches {
        for _ in 0..batch {
            b.emit("TEST_EVENT");
        }
        for _ in 0..batch {
            assert_eq!(fast.line().expect("an event")["event"], "TEST_EVENT");
        }
    }
    // The slow client finds its buffered events, then EOF.
    let got = slow.until_eof();
    assert!(got < total, "the slow client was cut off ({got} of {total})");
    assert_eq!(fast.ask(r#"{"execute": "echo", "id": 1}"#), json!({"return": {}, "id": 1}));
    assert_eq!(server.clients(), 1);
}

#[test]
fn pretty_output_and_many_clients() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.sock");
    let _s = Server::start(&path, true, Arc::new(Echo::default())).unwrap();
    let mut c = UnixStream::connect(&path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    while !got.ends_with(b"}\r\n") {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8(got).unwrap();
    assert!(text.starts_with("{\n    \"QMP\": {"), "{text}");
    let conns: Vec<Conn> = (0..super::MAX_CLIENTS - 1).map(|_| Conn::open(&path)).collect();
    let mut extra = Conn::open(&path);
    assert!(extra.line().is_none(), "past the limit a connection is closed at once");
    drop(conns);
}
