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
