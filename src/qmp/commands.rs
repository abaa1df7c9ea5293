//! The daemon's QMP commands, with QEMU's names, arguments and results.
//!
//! Each command parses all of its arguments into a typed struct first
//! ([`args::parse`]); only then does it call the daemon, whose operations
//! themselves check everything before changing anything. So a bad call
//! changes nothing.
//!
//! Where QEMU's wording for an error is known, it is used: a missing node or
//! export is a `GenericError` in QEMU's commands that blkstack implements
//! (`Cannot find device='' nor node-name='x'`, `Export 'x' is not found`), so
//! it is one here too.
//!
//! `nbd-server-start` takes QEMU's `SocketAddressLegacy` (`{"type": "unix",
//! "data": {"path": ...}}`), unlike `--nbd-server`, which takes the flat form;
//! both end in the same parser. TLS is not supported: naming credentials
//! fails as in QEMU when no such object exists.

use std::sync::mpsc::Receiver;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::args::{self, NoArgs};
use super::error::QmpError;
use super::info;
use super::session::Backend;
use crate::config::export::{parse_export, parse_nbd_server};
use crate::daemon::{Daemon, DeleteMode};

type Handler = fn(&Arc<Daemon>, Map<String, Value>) -> Result<Value, QmpError>;

/// The commands, in `query-commands` order.
const COMMANDS: &[(&str, Handler)] = &[
    ("blockdev-add", blockdev_add),
    ("blockdev-del", blockdev_del),
    ("query-named-block-nodes", query_named_block_nodes),
    ("block_resize", block_resize),
    ("query-blockstats", query_blockstats),
    ("block-export-add", block_export_add),
    ("block-export-del", block_export_del),
    ("query-block-exports", query_block_exports),
    ("nbd-server-start", nbd_server_start),
    ("nbd-server-stop", nbd_server_stop),
];

/// The daemon as a QMP backend.
pub struct DaemonBackend(pub Arc<Daemon>);

impl Backend for DaemonBackend {
    fn commands(&self) -> Vec<&'static str> {
        COMMANDS.iter().map(|(n, _)| *n).collect()
    }

    fn execute(&self, name: &str, args: Map<String, Value>) -> Option<Result<Value, QmpError>> {
        let (_, run) = COMMANDS.iter().find(|(n, _)| *n == name)?;
        Some(run(&self.0, args))
    }

    fn subscribe(&self) -> Receiver<Value> {
        self.0.subscribe()
    }

    fn request_quit(&self) {
        self.0.request_quit();
    }
}

fn ok() -> Result<Value, QmpError> {
    Ok(json!({}))
}

/// The option parsers' "Invalid parameter 'k'" in QMP's words.
fn option_error(e: String) -> QmpError {
    match e.strip_prefix("Invalid parameter '").and_then(|r| r.strip_suffix('\'')) {
        Some(key) if !key.contains('\'') => QmpError::generic(format!("Parameter '{key}' is unexpected")),
        _ => QmpError::generic(e),
    }
}

fn blockdev_add(d: &Arc<Daemon>, a: Map<String, Value>) -> Result<Value, QmpError> {
    d.blockdev_add(Value::Object(a)).map_err(option_error)?;
    ok()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct NodeNameArgs {
    node_name: String,
}

fn blockdev_del(d: &Arc<Daemon>, a: Map<String, Value>) -> Result<Value, QmpError> {
    let a: NodeNameArgs = args::parse(a)?;
    d.blockdev_del(&a.node_name)?;
    ok()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlatArgs {
    flat: Option<bool>,
}

fn query_named_block_nodes(d: &Arc<Daemon>, a: Map<String, Value>) -> Result<Value, QmpError> {
    let a: FlatArgs = args::parse(a)?;
    let flat = a.flat.unwrap_or(false);
    Ok(Value::Array(d.graph().nodes().iter().map(|n| info::block_device_info(n, flat)).collect()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ResizeArgs {
    device: Option<String>,
    node_name: Option<String>,
    size: i64,
}

fn block_resize(d: &Arc<Daemon>, a: Map<String, Value>) -> Result<Value, QmpError> {
    let a: ResizeArgs = args::parse(a)?;
    // blkstack has no block backends (devices), so `device` never matches,
    // exactly as in qemu-storage-daemon.
    let node = a.node_name.as_deref().and_then(|n| d.graph().get(n).ok()).ok_or_else(|| {
        QmpError::generic(format!("Cannot find device='{}' nor node-name='{}'", a.device.as_deref().unwrap_or(""), a.node_name.as_deref().unwrap_or("")))
    })?;
    let size = u64::try_from(a.size).map_err(|_| QmpError::expects("size", "a >0 size"))?;
    let done = crate::runtime::block_on(async move { node.truncate(size).await }).map_err(|e| QmpError::generic(format!("cannot resize: {e}")))?;
    done.map_err(|e| QmpError::generic(e.to_string()))?;
    ok()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BlockstatsArgs {
    query_nodes: Option<bool>,
}

fn query_blockstats(d: &Arc<Daemon>, a: Map<String, Value>) -> Result<Value, QmpError> {
    let a: BlockstatsArgs = args::parse(a)?;
    let nodes = d.graph().nodes();
    let shown = if a.query_nodes.unwrap_or(false) { nodes } else { info::roots(&nodes) };
    Ok(Value::Array(shown.iter().map(|n| info::block_stats(n, 0)).collect()))
}

fn block_export_add(d: &Arc<Daemon>, a: Map<String, Value>) -> Result<Value, QmpError> {
    let opts = parse_export(Value::Object(a)).map_err(option_error)?;
    d.export_add(opts)?;
    ok()
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Safe,
    Hard,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportDelArgs {
    id: String,
    mode: Option<Mode>,
}

fn block_export_del(d: &Arc<Daemon>, a: Map<String, Value>) -> Result<Value, QmpError> {
    let a: ExportDelArgs = args::parse(a)?;
    let mode = match a.mode {
        Some(Mode::Hard) => DeleteMode::Hard,
        Some(Mode::Safe) | None => DeleteMode::Safe,
    };
    d.export_del(&a.id, mode)?;
    ok()
}

fn query_block_exports(d: &Arc<Daemon>, a: Map<String, Value>) -> Result<Value, QmpError> {
    args::parse::<NoArgs>(a)?;
    serde_json::to_value(d.query_exports()).map_err(|e| QmpError::generic(e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct NbdStartArgs {
    addr: Map<String, Value>,
    tls_creds: Option<String>,
    tls_authz: Option<String>,
    max_connections: Option<u32>,
}

/// QEMU's `SocketAddressType`.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum AddrType {
    Inet,
    Unix,
    Vsock,
    Fd,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyAddr {
    #[serde(rename = "type")]
    kind: AddrType,
    data: Map<String, Value>,
}

/// `{"type": T, "data": {...}}` to the flat `{"type": T, ...}`.
fn flatten_legacy(addr: Map<String, Value>) -> Result<Value, QmpError> {
    let legacy: LegacyAddr = args::parse_at("addr", addr)?;
    let kind = match legacy.kind {
        AddrType::Inet => "inet",
        AddrType::Unix => "unix",
        AddrType::Fd => "fd",
        AddrType::Vsock => return Err(QmpError::generic("Parameter 'addr.type': vsock is not supported")),
    };
    let mut flat = legacy.data;
    flat.insert("type".into(), json!(kind));
    Ok(Value::Object(flat))
}

fn nbd_server_start(d: &Arc<Daemon>, a: Map<String, Value>) -> Result<Value, QmpError> {
    let a: NbdStartArgs = args::parse(a)?;
    if let Some(creds) = a.tls_creds {
        return Err(QmpError::generic(format!("No TLS credentials with id '{creds}'")));
    }
    if a.tls_authz.is_some() {
        return Err(QmpError::generic("'tls-authz' is only valid with 'tls-creds'"));
    }
    let addr = flatten_legacy(a.addr)?;
    let mut flat = json!({ "addr": addr });
    if let Some(n) = a.max_connections {
        flat["max-connections"] = json!(n);
    }
    // The parser names keys of the flat form; QMP's live under addr.data.
    let opts = parse_nbd_server(flat).map_err(|e| option_error(e.replace("'addr.type'", "'addr\u{0}type'").replace("'addr.", "'addr.data.").replace("'addr\u{0}type'", "'addr.type'")))?;
    d.nbd_server_start(&opts)?;
    ok()
}

fn nbd_server_stop(d: &Arc<Daemon>, a: Map<String, Value>) -> Result<Value, QmpError> {
    args::parse::<NoArgs>(a)?;
    d.nbd_server_stop()?;
    ok()
}

#[cfg(test)]
mod tests;
