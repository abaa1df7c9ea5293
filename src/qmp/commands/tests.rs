//! The commands against a real daemon (no exports' clients: those are in
//! tests/qmp with qemu-io and libblkio).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::DaemonBackend;
use crate::daemon::Daemon;
use crate::qmp::session::Backend;

struct T {
    dir: tempfile::TempDir,
    b: DaemonBackend,
}

impl T {
    fn new() -> T {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.img"), vec![0u8; 1 << 20]).unwrap();
        T { dir, b: DaemonBackend(Daemon::new().unwrap()) }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    fn run(&self, cmd: &str, args: Value) -> Result<Value, String> {
        let Value::Object(m) = args else { panic!("arguments must be an object") };
        match self.b.execute(cmd, m) {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => {
                assert_eq!(e.class, crate::qmp::ErrorClass::GenericError, "{e}");
                Err(e.desc)
            }
            None => panic!("no command {cmd}"),
        }
    }

    fn add_raw(&self) {
        let def = json!({"driver": "raw", "node-name": "r0", "file": {"driver": "file", "filename": self.path("a.img")}});
        assert_eq!(self.run("blockdev-add", def), Ok(json!({})));
    }

    fn names(&self) -> Vec<String> {
        let v = self.run("query-named-block-nodes", json!({"flat": true})).unwrap();
        v.as_array().unwrap().iter().map(|n| n["node-name"].as_str().unwrap().to_string()).collect()
    }
}

#[test]
fn unknown_names_are_not_commands() {
    let t = T::new();
    assert!(t.b.execute("query-status", Map::new()).is_none());
    assert!(t.b.commands().contains(&"block_resize"));
}

#[test]
fn blockdev_add_query_del() {
    let t = T::new();
    let bad = json!({"driver": "raw", "node-name": "r0", "file": {"driver": "file", "filename": t.path("a.img"), "bogus": 1}});
    assert_eq!(t.run("blockdev-add", bad), Err("Parameter 'file.bogus' is unexpected".into()));
    assert!(t.names().is_empty(), "a failed blockdev-add adds nothing");
    t.add_raw();
    let names = t.names();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"r0".to_string()));
    let nodes = t.run("query-named-block-nodes", json!({})).unwrap();
    let r0 = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "r0").unwrap().clone();
    assert_eq!((r0["drv"].clone(), r0["image"]["virtual-size"].clone()), (json!("raw"), json!(1 << 20)));
    assert_eq!(t.run("query-named-block-nodes", json!({"flat": 1})), Err("Invalid parameter type for 'flat', expected: boolean".into()));
    assert_eq!(t.run("blockdev-del", json!({})), Err("Parameter 'node-name' is missing".into()));
    assert_eq!(t.run("blockdev-del", json!({"node-name": "nope"})), Err("Failed to find node with node-name='nope'".into()));
    assert_eq!(t.run("blockdev-del", json!({"node-name": "r0"})), Ok(json!({})));
    assert!(t.names().is_empty());
}

#[test]
fn block_resize_checks_then_grows() {
    let t = T::new();
    t.add_raw();
    let cases = [
        (json!({"node-name": "r0"}), "Parameter 'size' is missing"),
        (json!({"node-name": "r0", "size": "2M"}), "Invalid parameter type for 'size', expected: integer"),
        (json!({"node-name": "r0", "size": 1, "extra": 1}), "Parameter 'extra' is unexpected"),
        (json!({"node-name": "nope", "size": 4096}), "Cannot find device='' nor node-name='nope'"),
        (json!({"device": "r0", "size": 4096}), "Cannot find device='r0' nor node-name=''"),
        (json!({"node-name": "r0", "size": -1}), "Parameter 'size' expects a >0 size"),
    ];
    for (args, want) in cases {
        assert_eq!(t.run("block_resize", args.clone()), Err(want.to_string()), "{args}");
    }
    assert_eq!(std::fs::metadata(t.path("a.img")).unwrap().len(), 1 << 20, "failed calls changed nothing");
    assert_eq!(t.run("block_resize", json!({"node-name": "r0", "size": 4 << 20})), Ok(json!({})));
    assert_eq!(std::fs::metadata(t.path("a.img")).unwrap().len(), 4 << 20);
    let nodes = t.run("query-named-block-nodes", json!({"flat": true})).unwrap();
    let r0 = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "r0").unwrap().clone();
    assert_eq!(r0["image"]["virtual-size"], json!(4 << 20));
}

#[test]
fn blockstats_roots_and_all_nodes() {
    let t = T::new();
    t.add_raw();
    let roots = t.run("query-blockstats", json!({})).unwrap();
    assert_eq!(roots.as_array().unwrap().len(), 1);
    assert_eq!(roots[0]["node-name"], "r0");
    assert!(roots[0]["parent"]["stats"]["wr_bytes"].is_u64());
    let all = t.run("query-blockstats", json!({"query-nodes": true})).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 2);
    assert_eq!(t.run("query-blockstats", json!({"query-nodes": "yes"})), Err("Invalid parameter type for 'query-nodes', expected: boolean".into()));
}

#[test]
fn nbd_server_start_takes_the_legacy_address() {
    let t = T::new();
    let sock = t.path("nbd.sock");
    let cases = [
        (json!({}), "Parameter 'addr' is missing".to_string()),
        (json!({"addr": {"type": "unix", "path": sock}}), "Parameter 'addr.path' is unexpected".to_string()),
        (json!({"addr": {"type": "unix"}}), "Parameter 'addr.data' is missing".to_string()),
        (json!({"addr": {"type": "unix", "data": {}}}), "Parameter 'addr.data.path' is missing".to_string()),
        (json!({"addr": {"type": "unix", "data": {"path": sock, "x": 1}}}), "Parameter 'addr.data.x' is unexpected".to_string()),
        (json!({"addr": {"type": "blah", "data": {}}}), "Parameter 'type' does not accept value 'blah'".to_string()),
        (json!({"addr": {"type": "unix", "data": {"path": sock}}, "max-connections": -1}), "Parameter 'max-connections' expects uint32".to_string()),
        (json!({"addr": {"type": "unix", "data": {"path": sock}}, "tls-creds": "t0"}), "No TLS credentials with id 't0'".to_string()),
    ];
    for (args, want) in cases {
        assert_eq!(t.run("nbd-server-start", args.clone()), Err(want), "{args}");
    }
    assert_eq!(t.run("nbd-server-stop", json!({})), Err("NBD server not running".into()), "failed starts started nothing");
    assert_eq!(t.run("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": sock}}})), Ok(json!({})));
    assert!(std::path::Path::new(&sock).exists());
    assert_eq!(t.run("nbd-server-stop", json!({"x": 1})), Err("Parameter 'x' is unexpected".into()));
    assert_eq!(t.run("nbd-server-stop", json!({})), Ok(json!({})));
}

#[test]
fn exports_block_blockdev_del_until_deleted() {
    let t = T::new();
    t.add_raw();
    let events = t.b.subscribe();
    let sock = t.path("nbd.sock");
    t.run("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": sock}}})).unwrap();
    assert_eq!(t.run("block-export-add", json!({"type": "nbd", "id": "e0"})), Err("Parameter 'node-name' is missing".into()));
    assert_eq!(t.run("block-export-add", json!({"type": "nbd", "id": "e0", "node-name": "r0", "foo": 1})), Err("Parameter 'foo' is unexpected".into()));
    assert_eq!(t.run("query-block-exports", json!({})), Ok(json!([])), "failed adds added nothing");
    assert_eq!(t.run("block-export-add", json!({"type": "nbd", "id": "e0", "node-name": "r0", "writable": true})), Ok(json!({})));
    assert_eq!(t.run("query-block-exports", json!({})), Ok(json!([{"id": "e0", "type": "nbd", "node-name": "r0", "shutting-down": false}])));
    assert!(t.run("blockdev-del", json!({"node-name": "r0"})).is_err(), "refused while exported");
    assert_eq!(t.run("block-export-del", json!({"id": "e0", "mode": "soft"})), Err("Parameter 'mode' does not accept value 'soft'".into()));
    assert_eq!(t.run("block-export-del", json!({"id": "nope"})), Err("Export 'nope' is not found".into()));
    assert_eq!(t.run("block-export-del", json!({"id": "e0"})), Ok(json!({})));
    let ev = events.recv_timeout(Duration::from_secs(20)).expect("BLOCK_EXPORT_DELETED");
    assert_eq!((ev["event"].clone(), ev["data"].clone()), (json!("BLOCK_EXPORT_DELETED"), json!({"id": "e0"})));
    assert_eq!(t.run("blockdev-del", json!({"node-name": "r0"})), Ok(json!({})));
    let _ = Arc::clone(&t.b.0);
}

/// A random JSON value for a random argument: scalars of every type, the
/// values these commands take (drivers, node names, this test's own paths),
/// and nested objects and arrays.
fn random_value(rng: &mut rand::rngs::StdRng, t: &T, depth: u32) -> Value {
    use rand::Rng;
    let words = ["null-co", "null-aio", "file", "raw", "qcow2", "vhost-user-blk", "nbd", "unix", "inet", "fd", "n0", "n1", "#block0", "e0", "e1", "", "safe", "hard", "on", "off", "unmap", "ignore", "io_uring", "threads", "native", "a\u{0}b", "4096"];
    match rng.gen_range(0..12) {
        0 => Value::Null,
        1 => json!(rng.gen_bool(0.5)),
        2 => json!([0i64, 1, -1, 512, 4096, 1 << 20, 1 << 40, i64::MAX, i64::MIN][rng.gen_range(0..9)]),
        3 => json!([u64::MAX as f64, 1.5, -0.0, 1e300][rng.gen_range(0..4)]),
        4 | 5 => json!(words[rng.gen_range(0..words.len())]),
        6 => json!([t.path("a.img"), t.path("missing.img"), t.path("v0.sock"), t.path("n.sock"), t.path("")][rng.gen_range(0..5)]),
        7 => json!("x".repeat(300)),
        8 if depth < 3 => Value::Array((0..rng.gen_range(0..3)).map(|_| random_value(rng, t, depth + 1)).collect()),
        _ if depth < 3 => Value::Object(random_args(rng, t, depth + 1)),
        _ => json!(7),
    }
}

/// Random arguments: keys these commands know, and some they do not.
fn random_args(rng: &mut rand::rngs::StdRng, t: &T, depth: u32) -> Map<String, Value> {
    use rand::Rng;
    let keys = ["driver", "node-name", "file", "filename", "size", "read-only", "auto-read-only", "cache", "direct", "no-flush", "aio", "locking", "discard", "detect-zeroes", "offset", "read-zeroes", "latency-ns", "force-share", "id", "type", "addr", "path", "data", "writable", "num-queues", "queue-size", "logical-block-size", "poll-us", "poll-max-ns", "poll-grow", "poll-shrink", "device", "flat", "mode", "name", "description", "tls-creds", "max-connections", "x-junk"];
    (0..rng.gen_range(0..6)).map(|_| (keys[rng.gen_range(0..keys.len())].to_string(), random_value(rng, t, depth))).collect()
}

/// Random calls of every command (random, partly sensible arguments, on a
/// graph that has nodes, exports and an NBD server some of the time)
/// answer with a result or a GenericError, never panic, and leave a daemon
/// whose queries still answer and that shuts down.
#[test]
fn random_calls_answer_and_leave_a_working_daemon() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0071_6d70);
    let t = T::new();
    let cmds = t.b.commands();
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..3000 {
        let cmd = cmds[rng.gen_range(0..cmds.len())];
        let mut args = random_args(&mut rng, &t, 0);
        // Sensible calls now and then, so later ones meet real nodes and exports.
        if rng.gen_bool(0.3) {
            let node = ["n0", "n1"][rng.gen_range(0..2)];
            let sensible = match cmd {
                "blockdev-add" if rng.gen_bool(0.5) => json!({"driver": "null-co", "node-name": node, "size": 1 << 20}),
                "blockdev-add" => json!({"driver": "raw", "node-name": node, "file": {"driver": "file", "filename": t.path("a.img")}}),
                "block-export-add" if rng.gen_bool(0.5) => json!({"type": "nbd", "id": "e0", "node-name": node}),
                "block-export-add" => json!({"type": "vhost-user-blk", "id": "e1", "node-name": node, "addr": {"type": "unix", "path": t.path("v0.sock")}}),
                "nbd-server-start" => json!({"addr": {"type": "unix", "data": {"path": t.path("n.sock")}}}),
                "block_resize" => json!({"node-name": node, "size": 2 << 20}),
                "blockdev-del" => json!({"node-name": node}),
                "block-export-del" => json!({"id": if rng.gen_bool(0.5) { "e0" } else { "e1" }}),
                _ => json!({}),
            };
            let Value::Object(s) = sensible else { unreachable!() };
            // Keep the sensible keys, with a random one added sometimes.
            let extra = args.into_iter().next().filter(|_| rng.gen_bool(0.2));
            args = s;
            if let Some((k, v)) = extra {
                args.insert(k, v);
            }
        }
        match t.b.execute(cmd, args.clone()) {
            Some(Ok(_)) => ok += 1,
            Some(Err(e)) => {
                assert_eq!(e.class, crate::qmp::ErrorClass::GenericError, "{cmd} {args:?}: {e}");
                assert!(!e.desc.is_empty(), "{cmd} {args:?}");
                refused += 1;
            }
            None => panic!("{cmd} is listed but not run"),
        }
    }
    assert!(ok > 100 && refused > 1000, "{ok} answered, {refused} refused");
    // The daemon still answers, and its state is whole.
    let nodes = t.run("query-named-block-nodes", json!({})).unwrap();
    assert!(nodes.is_array());
    let exports = t.run("query-block-exports", json!({})).unwrap();
    for e in exports.as_array().unwrap() {
        let node = e["node-name"].as_str().unwrap();
        assert!(t.names().iter().any(|n| n == node), "export {e} on a node that is gone");
    }
    t.b.0.shutdown();
}
