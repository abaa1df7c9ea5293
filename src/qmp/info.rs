//! Result shapes of `query-named-block-nodes` (QEMU's `BlockDeviceInfo`) and
//! `query-blockstats` (`BlockStats`), built from the public node API.
//!
//! What blkstack does not have is reported as QEMU reports its absence:
//! throttling limits are 0 (blkstack's throttle is a filter driver, as in
//! modern QEMU), `encrypted` is false, `write_threshold` is 0 (unset), and the
//! zone-append counters are 0 (no zoned devices). `cache.writeback` is always
//! true: nodes added with `--blockdev` / `blockdev-add` always have a write
//! cache (QEMU's `cache.writeback` is a device property). `cache.direct` is
//! read from the `file` node at the bottom of the node's file chain: the file
//! driver needs request alignment only when opened with `O_DIRECT`.
//!
//! Without `query-nodes`, QEMU's `query-blockstats` lists block backends
//! (guest devices), which blkstack has none of; it lists the graph's roots
//! instead (nodes no other node uses as a child), in the same shape.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::block::{BlockNode, ChildRole, DetectZeroes};

fn child(node: &BlockNode, role: ChildRole) -> Option<Arc<BlockNode>> {
    node.children().into_iter().find(|(r, _)| *r == role).map(|(_, c)| c)
}

/// The node at the bottom of the chain of `file` children.
fn protocol_leaf(node: &Arc<BlockNode>) -> Arc<BlockNode> {
    let mut cur = node.clone();
    // Bounded: a graph is acyclic, but never trust that with a loop.
    for _ in 0..64 {
        match child(&cur, ChildRole::File) {
            Some(c) => cur = c,
            None => break,
        }
    }
    cur
}

/// The file name QEMU shows: the driver's, else the protocol's, else
/// `DRIVER://` (as QEMU's null drivers).
fn filename(node: &Arc<BlockNode>) -> String {
    if let Some(f) = node.filename() {
        return f;
    }
    let leaf = protocol_leaf(node);
    leaf.filename().unwrap_or_else(|| format!("{}://", leaf.format_name()))
}

fn detect_zeroes(d: DetectZeroes) -> &'static str {
    match d {
        DetectZeroes::Off => "off",
        DetectZeroes::On => "on",
        DetectZeroes::Unmap => "unmap",
    }
}

fn cache_direct(node: &Arc<BlockNode>) -> bool {
    node.options().direct
}

/// Host bytes allocated to the image file, for `file`-based nodes.
fn actual_size(node: &Arc<BlockNode>) -> Option<u64> {
    let leaf = protocol_leaf(node);
    if leaf.format_name() != "file" {
        return None;
    }
    let meta = std::fs::metadata(leaf.filename()?).ok()?;
    meta.file_type().is_file().then(|| meta.blocks() * 512)
}

/// QEMU's `ImageInfo`; with `chain`, the backing image nests under `backing-image`.
fn image_info(node: &Arc<BlockNode>, chain: bool, depth: usize) -> Value {
    let mut m = Map::new();
    m.insert("filename".into(), json!(filename(node)));
    m.insert("format".into(), json!(node.format_name()));
    m.insert("virtual-size".into(), json!(node.length()));
    if let Some(a) = actual_size(node) {
        m.insert("actual-size".into(), json!(a));
    }
    if let Some(b) = child(node, ChildRole::Backing) {
        m.insert("backing-filename".into(), json!(filename(&b)));
        if chain && depth < 64 {
            m.insert("backing-image".into(), image_info(&b, true, depth + 1));
        }
    }
    Value::Object(m)
}

fn backing_depth(node: &Arc<BlockNode>) -> usize {
    let mut n = 0;
    let mut cur = child(node, ChildRole::Backing);
    while let Some(b) = cur {
        n += 1;
        if n >= 64 {
            break;
        }
        cur = child(&b, ChildRole::Backing);
    }
    n
}

/// QEMU's `BlockDeviceInfo` for one node; `flat` leaves out the backing chain.
pub fn block_device_info(node: &Arc<BlockNode>, flat: bool) -> Value {
    let opts = node.options();
    let mut v = json!({
        "file": filename(node),
        "node-name": node.name(),
        "ro": node.is_read_only(),
        "drv": node.format_name(),
        "backing_file_depth": backing_depth(node),
        "active": true,
        "encrypted": false,
        "detect_zeroes": detect_zeroes(opts.detect_zeroes),
        "bps": 0, "bps_rd": 0, "bps_wr": 0,
        "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "image": image_info(node, !flat, 0),
        "cache": { "writeback": true, "direct": cache_direct(node), "no-flush": opts.no_flush },
        "write_threshold": 0,
    });
    if let Some(b) = child(node, ChildRole::Backing) {
        v["backing_file"] = json!(filename(&b));
    }
    v
}

/// QEMU's `BlockDeviceStats` for one node.
fn device_stats(node: &BlockNode) -> Value {
    let mut v = serde_json::to_value(node.stats()).unwrap_or_else(|_| json!({}));
    if let Value::Object(m) = &mut v {
        for key in ["zone_append_bytes", "zone_append_operations", "zone_append_total_time_ns", "zone_append_merged", "failed_zone_append_operations", "invalid_zone_append_operations"] {
            m.entry(key).or_insert(json!(0));
        }
    }
    v
}

/// QEMU's `BlockStats` for one node, with its file (`parent`) and backing
/// children nested the way QEMU nests them.
pub fn block_stats(node: &Arc<BlockNode>, depth: usize) -> Value {
    let mut m = Map::new();
    m.insert("node-name".into(), json!(node.name()));
    m.insert("stats".into(), device_stats(node));
    if depth < 64 {
        if let Some(f) = child(node, ChildRole::File) {
            m.insert("parent".into(), block_stats(&f, depth + 1));
        }
        if let Some(b) = child(node, ChildRole::Backing) {
            m.insert("backing".into(), block_stats(&b, depth + 1));
        }
    }
    Value::Object(m)
}

/// The nodes that no other node of `nodes` uses as a child.
pub fn roots(nodes: &[Arc<BlockNode>]) -> Vec<Arc<BlockNode>> {
    let children: HashSet<String> = nodes.iter().flat_map(|n| n.children()).map(|(_, c)| c.name().to_string()).collect();
    nodes.iter().filter(|n| !children.contains(n.name())).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockGraph;

    fn graph() -> (tempfile::TempDir, BlockGraph) {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        std::fs::write(&img, vec![1u8; 8192]).unwrap();
        let g = BlockGraph::new();
        let def = json!({"driver": "raw", "node-name": "r0", "file": {"driver": "file", "filename": img}});
        crate::config::blockdev::add(&g, def).unwrap();
        crate::config::blockdev::add(&g, json!({"driver": "null-co", "node-name": "n0", "size": 4096, "read-only": true})).unwrap();
        (dir, g)
    }

    #[test]
    fn node_info_has_qemus_shape() {
        let (dir, g) = graph();
        let r0 = g.get("r0").unwrap();
        let v = block_device_info(&r0, true);
        let img = dir.path().join("a.img").to_string_lossy().into_owned();
        assert_eq!((v["drv"].as_str(), v["ro"].as_bool(), v["file"].as_str()), (Some("raw"), Some(false), Some(img.as_str())));
        assert_eq!(v["image"]["virtual-size"], 8192);
        assert_eq!(v["image"]["format"], "raw");
        assert!(v["image"]["actual-size"].as_u64().is_some());
        assert_eq!(v["cache"], json!({"writeback": true, "direct": false, "no-flush": false}));
        assert_eq!(v["detect_zeroes"], "off");
        let n0 = block_device_info(&g.get("n0").unwrap(), false);
        assert_eq!((n0["file"].as_str(), n0["ro"].as_bool()), (Some("null-co://"), Some(true)));
        assert!(n0["image"].get("actual-size").is_none());
    }

    #[test]
    fn stats_nest_the_file_child_under_parent() {
        let (_dir, g) = graph();
        let nodes = g.nodes();
        let names: Vec<String> = roots(&nodes).iter().map(|n| n.name().to_string()).collect();
        assert_eq!(names, ["n0", "r0"]);
        let v = block_stats(&g.get("r0").unwrap(), 0);
        assert_eq!(v["node-name"], "r0");
        assert!(v["parent"]["node-name"].as_str().is_some_and(|n| n.starts_with('#')), "{v}");
        for key in ["rd_bytes", "wr_operations", "flush_total_time_ns", "wr_highest_offset", "zone_append_bytes", "invalid_unmap_operations", "account_failed"] {
            assert!(v["stats"].get(key).is_some(), "{key} missing in {v}");
        }
    }
}
