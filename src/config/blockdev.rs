//! `--blockdev` / `blockdev-add`: from an option tree to nodes in the graph.
//!
//! Two phases, so that a bad definition changes nothing:
//! 1. **plan**: every key of every node (inline children included) is parsed
//!    into typed options, references to existing nodes are resolved, and all
//!    new node-names are checked against the graph and each other;
//! 2. **open**: drivers are opened children first. If one fails, the nodes
//!    opened so far are dropped (closing their files) and nothing reaches the
//!    graph; only when all opened are they inserted.
//!
//! Inline children inherit `read-only`, `auto-read-only`, `cache.direct`,
//! `cache.no-flush`, `discard` and `force-share` from their parent unless they
//! set them, as in QEMU.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::block::graph::check_node_name;
use crate::block::{BlockDriver, BlockGraph, BlockNode, DetectZeroes, NodeOptions};
use crate::config::types::Flag;
use crate::drivers::file::{FileDriver, FileOptions, OpenFlags};
use crate::drivers::null::{NullDriver, NullOptions};
use crate::drivers::raw::{RawDriver, RawOptions};

/// QEMU's `discard` option.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Discard {
    Ignore,
    Off,
    Unmap,
    On,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct CacheOptions {
    direct: Option<Flag>,
    no_flush: Option<Flag>,
}

/// The options every driver shares (QEMU's `BlockdevOptionsBase`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct CommonOptions {
    driver: Option<String>,
    node_name: Option<String>,
    read_only: Option<Flag>,
    auto_read_only: Option<Flag>,
    force_share: Option<Flag>,
    discard: Option<Discard>,
    detect_zeroes: Option<DetectZeroes>,
    cache: Option<CacheOptions>,
}

const COMMON_KEYS: &[&str] = &["driver", "node-name", "read-only", "auto-read-only", "force-share", "discard", "detect-zeroes", "cache"];

/// Effective generic settings of a node after inheritance.
#[derive(Debug, Clone, Copy, Default)]
struct Inherited {
    read_only: Option<bool>,
    auto_read_only: Option<bool>,
    direct: Option<bool>,
    no_flush: Option<bool>,
    discard_unmap: Option<bool>,
    force_share: Option<bool>,
}

enum DriverPlan {
    File(FileOptions),
    Null(&'static str, NullOptions),
    Raw(RawOptions, Box<ChildPlan>),
}

enum ChildPlan {
    Existing(Arc<BlockNode>),
    New(NodePlan),
}

struct NodePlan {
    name: String,
    implicit: bool,
    settings: Inherited,
    detect_zeroes: DetectZeroes,
    driver: DriverPlan,
}

/// Parses `T` from `v`, naming keys with `prefix` in errors.
pub(crate) fn typed<T: DeserializeOwned>(v: Value, prefix: &str) -> Result<T, String> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        let key = |field: &str| {
            let mut k = String::from(prefix);
            if path != "." && !path.is_empty() {
                k.push_str(&path);
                k.push('.');
            }
            k.push_str(field);
            k
        };
        if let Some(field) = msg.strip_prefix("unknown field `").and_then(|r| r.split('`').next()) {
            // The path already ends with the unknown key.
            let full = if path.ends_with(field) { format!("{prefix}{path}") } else { key(field) };
            return format!("Invalid parameter '{full}'");
        }
        if let Some(field) = msg.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
            return format!("Parameter '{}' is missing", key(field));
        }
        let full = if path == "." { prefix.trim_end_matches('.').to_string() } else { format!("{prefix}{path}") };
        let msg = msg.split(" at line ").next().unwrap_or(&msg);
        format!("Parameter '{full}': {msg}")
    })
}

fn take_common(obj: &mut Map<String, Value>, prefix: &str) -> Result<CommonOptions, String> {
    let mut common = Map::new();
    for k in COMMON_KEYS {
        if let Some(v) = obj.remove(*k) {
            common.insert(k.to_string(), v);
        }
    }
    typed(Value::Object(common), prefix)
}

struct Planner<'g> {
    graph: &'g BlockGraph,
    names: Vec<String>,
    next_implicit: usize,
}

impl Planner<'_> {
    fn implicit_name(&mut self) -> String {
        loop {
            let n = format!("#block{}", self.next_implicit);
            self.next_implicit += 1;
            if !self.graph.contains(&n) && !self.names.contains(&n) {
                return n;
            }
        }
    }

    fn node(&mut self, v: Value, prefix: &str, parent: Inherited, top: bool) -> Result<NodePlan, String> {
        let Value::Object(mut obj) = v else {
            return Err(format!("Parameter '{}' expects an object or a node-name", prefix.trim_end_matches('.')));
        };
        let common = take_common(&mut obj, prefix)?;
        let driver = common.driver.clone().ok_or_else(|| format!("Parameter '{prefix}driver' is missing"))?;
        let name = match &common.node_name {
            Some(n) => {
                check_node_name(n).map_err(|e| e.to_string())?;
                if self.graph.contains(n) || self.names.contains(n) {
                    return Err(format!("Duplicate nodes with node-name='{n}'"));
                }
                n.clone()
            }
            None if top => return Err("Parameter 'node-name' is missing: a top-level block node needs a node-name".into()),
            None => self.implicit_name(),
        };
        self.names.push(name.clone());
        let settings = settings(&common, parent);
        let detect_zeroes = common.detect_zeroes.unwrap_or_default();
        if detect_zeroes == DetectZeroes::Unmap && settings.discard_unmap != Some(true) {
            return Err("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".into());
        }
        let rest = Value::Object(obj);
        let driver = match driver.as_str() {
            "file" => DriverPlan::File(typed(rest, prefix)?),
            "null-co" => DriverPlan::Null("null-co", typed(rest, prefix)?),
            "null-aio" => DriverPlan::Null("null-aio", typed(rest, prefix)?),
            "raw" => self.raw(rest, prefix, settings)?,
            other => return Err(format!("Parameter '{prefix}driver' does not accept value '{other}' (drivers: file, null-co, null-aio, raw)")),
        };
        Ok(NodePlan { name, implicit: common.node_name.is_none(), settings, detect_zeroes, driver })
    }

    fn raw(&mut self, rest: Value, prefix: &str, settings: Inherited) -> Result<DriverPlan, String> {
        let Value::Object(mut obj) = rest else { return Err("internal: options are not an object".into()) };
        let file = obj.remove("file").ok_or_else(|| format!("Parameter '{prefix}file' is missing"))?;
        let opts: RawOptions = typed(Value::Object(obj), prefix)?;
        let child = self.child(file, &format!("{prefix}file."), settings)?;
        Ok(DriverPlan::Raw(opts, Box::new(child)))
    }

    fn child(&mut self, v: Value, prefix: &str, parent: Inherited) -> Result<ChildPlan, String> {
        match v {
            Value::String(name) => {
                let node = self.graph.get(&name).map_err(|e| e.to_string())?;
                if parent.read_only != Some(true) && node.is_read_only() {
                    return Err(format!("Block node '{name}' is read-only; its parent needs it writable"));
                }
                Ok(ChildPlan::Existing(node))
            }
            v => self.node(v, prefix, parent, false).map(ChildPlan::New),
        }
    }
}

fn settings(c: &CommonOptions, parent: Inherited) -> Inherited {
    let cache = c.cache.as_ref();
    Inherited {
        read_only: c.read_only.map(|f| f.0).or(parent.read_only),
        auto_read_only: c.auto_read_only.map(|f| f.0).or(parent.auto_read_only),
        direct: cache.and_then(|c| c.direct).map(|f| f.0).or(parent.direct),
        no_flush: cache.and_then(|c| c.no_flush).map(|f| f.0).or(parent.no_flush),
        discard_unmap: c.discard.map(|d| matches!(d, Discard::Unmap | Discard::On)).or(parent.discard_unmap),
        force_share: c.force_share.map(|f| f.0).or(parent.force_share),
    }
}

fn open(plan: NodePlan, opened: &mut Vec<Arc<BlockNode>>) -> Result<Arc<BlockNode>, String> {
    let s = plan.settings;
    let mut read_only = s.read_only.unwrap_or(false);
    let driver: Box<dyn BlockDriver> = match plan.driver {
        DriverPlan::File(o) => {
            let flags = OpenFlags {
                read_only,
                auto_read_only: s.auto_read_only.unwrap_or(false),
                direct: s.direct.unwrap_or(false),
                force_share: s.force_share.unwrap_or(false),
            };
            let (d, ro) = FileDriver::open(&o, flags)?;
            read_only = ro;
            Box::new(d)
        }
        DriverPlan::Null(name, o) => Box::new(NullDriver::new(name, &o)?),
        DriverPlan::Raw(o, child) => {
            let child = match *child {
                ChildPlan::Existing(n) => n,
                ChildPlan::New(p) => open(p, opened)?,
            };
            read_only |= child.is_read_only();
            Box::new(RawDriver::new(child, &o)?)
        }
    };
    let opts = NodeOptions { read_only, discard_unmap: s.discard_unmap.unwrap_or(false), detect_zeroes: plan.detect_zeroes, no_flush: s.no_flush.unwrap_or(false), direct: s.direct.unwrap_or(false) };
    let node = BlockNode::new(plan.name, plan.implicit, driver, opts);
    opened.push(node.clone());
    Ok(node)
}

/// Creates the node(s) `v` describes and adds them to `graph`. On error,
/// nothing was added. Returns the top node.
pub fn add(graph: &BlockGraph, v: Value) -> Result<Arc<BlockNode>, String> {
    let mut planner = Planner { graph, names: Vec::new(), next_implicit: 0 };
    let plan = planner.node(v, "", Inherited::default(), true)?;
    let mut opened = Vec::new();
    let top = open(plan, &mut opened)?;
    graph.insert(top.clone()).map_err(|e| e.to_string())?;
    Ok(top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::keyval::parse_arg;

    fn add_str(g: &BlockGraph, s: &str) -> Result<Arc<BlockNode>, String> {
        add(g, parse_arg(s, None)?)
    }

    #[test]
    fn raw_over_inline_file_with_offset() {
        let img = tempfile::NamedTempFile::new().unwrap();
        img.as_file().set_len(1 << 20).unwrap();
        let g = BlockGraph::new();
        let line = format!("driver=raw,node-name=r0,offset=4k,size=64k,file.driver=file,file.filename={},read-only=on", img.path().display());
        let top = add_str(&g, &line).unwrap();
        assert_eq!(top.length(), 64 << 10);
        assert!(top.is_read_only());
        let children = top.children();
        assert_eq!(children.len(), 1);
        assert!(children[0].1.is_implicit());
        assert!(children[0].1.is_read_only(), "read-only is inherited by the inline child");
        assert_eq!(g.nodes().len(), 2);
    }

    #[test]
    fn errors_name_the_key_and_change_nothing() {
        let img = tempfile::NamedTempFile::new().unwrap();
        let p = img.path().display();
        let g = BlockGraph::new();
        let cases = [
            (format!("driver=file,node-name=f0,filename={p},bogus=1"), "'bogus'"),
            ("driver=file,node-name=f0".to_string(), "'filename'"),
            (format!("driver=raw,node-name=r0,file.driver=file,file.filename={p},file.aio=fast"), "'file.aio'"),
            (format!("driver=file,node-name=f0,filename={p},cache.direct=maybe"), "'cache.direct'"),
            (format!("driver=file,filename={p}"), "'node-name'"),
            ("driver=nope,node-name=x".to_string(), "'driver'"),
            ("driver=null-co,node-name=n0,size=12q".to_string(), "'size'"),
            ("driver=raw,node-name=r0,file=missing".to_string(), "missing"),
            (format!("driver=raw,node-name=r0,size=1M,file.driver=file,file.filename={p}"), "size"),
            ("driver=file,node-name=f0,filename=/nonexistent/img".to_string(), "Could not open"),
            ("driver=null-co,node-name=n0,detect-zeroes=unmap".to_string(), "detect-zeroes"),
        ];
        for (line, want) in cases {
            let err = add_str(&g, &line).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
            assert!(g.nodes().is_empty(), "{line} left nodes behind");
        }
    }

    #[test]
    fn duplicate_names_are_refused() {
        let g = BlockGraph::new();
        add_str(&g, "driver=null-co,node-name=n0").unwrap();
        assert!(add_str(&g, "driver=null-co,node-name=n0").unwrap_err().contains("Duplicate"));
        let err = add(&g, serde_json::json!({"driver": "raw", "node-name": "r1", "file": {"driver": "null-co", "node-name": "r1"}})).unwrap_err();
        assert!(err.contains("Duplicate"), "{err}");
        assert_eq!(g.nodes().len(), 1);
        let r = add(&g, serde_json::json!({"driver": "raw", "node-name": "r0", "file": "n0"})).unwrap();
        assert_eq!(r.length(), 1 << 30);
    }
}
