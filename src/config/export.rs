//! `--export`, `--nbd-server`, `--chardev` and `--monitor`: typed options
//! with QEMU's names.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

use super::blockdev::typed;
use super::types::{CpuList, Flag, Num};

/// A unix socket address (`addr.type=unix,addr.path=...`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnixAddr {
    /// Socket path.
    pub path: PathBuf,
}

/// QEMU's `SocketAddress` for the forms blkstack serves on.
#[derive(Debug, Clone)]
pub enum SocketAddr {
    /// `type=unix,path=...`
    Unix(PathBuf),
    /// `type=inet,host=...,port=...`
    Inet {
        /// Host name or address.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// `type=fd,str=N`: an inherited, already-listening socket (systemd).
    Fd(i32),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InetAddr {
    host: String,
    port: Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FdAddr {
    str: String,
}

/// Parses a `SocketAddress` object at `prefix` (e.g. `addr.`).
pub fn socket_addr(v: Value, prefix: &str, allow_inet: bool) -> Result<SocketAddr, String> {
    let Value::Object(mut obj) = v else { return Err(format!("Parameter '{}' expects an object", prefix.trim_end_matches('.'))) };
    let ty = obj.remove("type").ok_or_else(|| format!("Parameter '{prefix}type' is missing"))?;
    let rest = Value::Object(obj);
    match ty.as_str() {
        Some("unix") => Ok(SocketAddr::Unix(typed::<UnixAddr>(rest, prefix)?.path)),
        Some("inet") if allow_inet => {
            let a: InetAddr = typed(rest, prefix)?;
            let port = match &a.port {
                Value::String(s) => s.parse::<u16>().ok(),
                Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                _ => None,
            };
            let port = port.ok_or_else(|| format!("Parameter '{prefix}port' expects a port number (0-65535)"))?;
            Ok(SocketAddr::Inet { host: a.host, port })
        }
        Some("fd") => {
            let a: FdAddr = typed(rest, prefix)?;
            let fd = a.str.parse::<i32>().ok().filter(|&fd| fd >= 3).ok_or_else(|| format!("Parameter '{prefix}str' expects a file descriptor number ≥ 3"))?;
            Ok(SocketAddr::Fd(fd))
        }
        _ => {
            let allowed = if allow_inet { "'unix', 'inet' or 'fd'" } else { "'unix' or 'fd'" };
            Err(format!("Parameter '{prefix}type' does not accept value {ty} (expected {allowed})"))
        }
    }
}

/// Options of `--export type=vhost-user-blk`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct VhostRaw {
    id: String,
    node_name: String,
    #[serde(default)]
    writable: Option<Flag>,
    addr: Value,
    #[serde(default)]
    num_queues: Option<Num>,
    #[serde(default)]
    logical_block_size: Option<Num>,
    #[serde(default)]
    queue_size: Option<Num>,
    #[serde(default)]
    serial: Option<String>,
    #[serde(default)]
    poll_us: Option<Num>,
    #[serde(default)]
    poll_max_ns: Option<Num>,
    #[serde(default)]
    poll_grow: Option<Num>,
    #[serde(default)]
    poll_shrink: Option<Num>,
    #[serde(default)]
    cpu_affinity: Option<CpuList>,
}

/// Options of `--export type=nbd`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct NbdRaw {
    id: String,
    node_name: String,
    #[serde(default)]
    writable: Option<Flag>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

/// A vhost-user-blk export definition.
#[derive(Debug, Clone)]
pub struct VhostExportOptions {
    /// Export id.
    pub id: String,
    /// The node it exports.
    pub node_name: String,
    /// Whether the guest may write.
    pub writable: bool,
    /// Where to listen.
    pub addr: SocketAddr,
    /// Number of virtqueues (QSD's default: 1).
    pub num_queues: u64,
    /// Logical block size (default 512).
    pub logical_block_size: u64,
    /// Virtqueue size (default 256).
    pub queue_size: u64,
    /// Serial returned by GET_ID.
    pub serial: Option<String>,
    /// Busy-poll the queue this long before sleeping (0: never).
    pub poll_us: u64,
    /// The longest adaptive polling window (0: no adaptive polling).
    pub poll_max_ns: u64,
    /// Adaptive window growth factor (0: 2).
    pub poll_grow: u64,
    /// Adaptive window shrink divisor (0: back to 0).
    pub poll_shrink: u64,
    /// `cpu-affinity`: queue thread i runs on CPU `cpu_affinity[i % len]`
    /// (empty: wherever the scheduler puts it).
    pub cpu_affinity: Vec<u16>,
}

/// An NBD export definition.
#[derive(Debug, Clone)]
pub struct NbdExportOptions {
    /// Export id.
    pub id: String,
    /// The node it exports.
    pub node_name: String,
    /// Whether clients may write.
    pub writable: bool,
    /// Export name (default: the node-name).
    pub name: String,
    /// Free-form description.
    pub description: Option<String>,
}

/// A parsed `--export` / `block-export-add`.
#[derive(Debug, Clone)]
pub enum ExportOptions {
    /// `type=vhost-user-blk`
    VhostUserBlk(VhostExportOptions),
    /// `type=nbd`
    Nbd(NbdExportOptions),
}

impl ExportOptions {
    /// The export id.
    pub fn id(&self) -> &str {
        match self {
            ExportOptions::VhostUserBlk(o) => &o.id,
            ExportOptions::Nbd(o) => &o.id,
        }
    }

    /// The exported node.
    pub fn node_name(&self) -> &str {
        match self {
            ExportOptions::VhostUserBlk(o) => &o.node_name,
            ExportOptions::Nbd(o) => &o.node_name,
        }
    }
}

fn check_id(id: &str) -> Result<(), String> {
    crate::block::graph::check_node_name(id).map_err(|_| format!("Parameter 'id': invalid export id '{id}' (a letter, then letters, digits, '-', '.', '_')"))
}

/// Parses one export definition.
pub fn parse_export(v: Value) -> Result<ExportOptions, String> {
    let Value::Object(mut obj) = v else { return Err("an export must be an object".into()) };
    let ty = obj.remove("type").ok_or("Parameter 'type' is missing")?;
    let rest = Value::Object(obj);
    let opts = match ty.as_str() {
        Some("vhost-user-blk") => {
            let r: VhostRaw = typed(rest, "")?;
            check_id(&r.id)?;
            if r.poll_us.is_some() && (r.poll_max_ns.is_some() || r.poll_grow.is_some() || r.poll_shrink.is_some()) {
                return Err("Parameter 'poll-us': a fixed polling window cannot be combined with the adaptive one (poll-max-ns, poll-grow, poll-shrink)".into());
            }
            ExportOptions::VhostUserBlk(VhostExportOptions {
                addr: socket_addr(r.addr, "addr.", false)?,
                id: r.id,
                node_name: r.node_name,
                writable: r.writable.is_some_and(|f| f.0),
                num_queues: r.num_queues.map_or(1, |n| n.0),
                logical_block_size: r.logical_block_size.map_or(512, |n| n.0),
                queue_size: r.queue_size.map_or(256, |n| n.0),
                serial: r.serial,
                poll_us: r.poll_us.map_or(0, |n| n.0),
                poll_max_ns: r.poll_max_ns.map_or(crate::vhost::config::DEFAULT_POLL_MAX_NS, |n| n.0),
                poll_grow: r.poll_grow.map_or(0, |n| n.0),
                poll_shrink: r.poll_shrink.map_or(0, |n| n.0),
                cpu_affinity: r.cpu_affinity.map_or_else(Vec::new, |c| c.0),
            })
        }
        Some("nbd") => {
            let r: NbdRaw = typed(rest, "")?;
            check_id(&r.id)?;
            if r.name.as_ref().is_some_and(|n| n.len() > 4096) {
                return Err("Parameter 'name': an NBD export name is at most 4096 bytes".into());
            }
            ExportOptions::Nbd(NbdExportOptions {
                name: r.name.unwrap_or_else(|| r.node_name.clone()),
                id: r.id,
                node_name: r.node_name,
                writable: r.writable.is_some_and(|f| f.0),
                description: r.description,
            })
        }
        _ => return Err(format!("Parameter 'type' does not accept value {ty} (expected 'vhost-user-blk' or 'nbd')")),
    };
    Ok(opts)
}

/// `--nbd-server` / `nbd-server-start`.
#[derive(Debug, Clone)]
pub struct NbdServerOptions {
    /// Where to listen.
    pub addr: SocketAddr,
    /// Most simultaneous connections (0: unlimited).
    pub max_connections: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct NbdServerRaw {
    addr: Value,
    #[serde(default)]
    max_connections: Option<Num>,
}

/// Parses `--nbd-server`.
pub fn parse_nbd_server(v: Value) -> Result<NbdServerOptions, String> {
    let r: NbdServerRaw = typed(v, "")?;
    let max = r.max_connections.map_or(0, |n| n.0);
    let max_connections = u32::try_from(max).map_err(|_| "Parameter 'max-connections' is too large".to_string())?;
    Ok(NbdServerOptions { addr: socket_addr(r.addr, "addr.", true)?, max_connections })
}

/// `--chardev socket,id=...,path=...,server=on,wait=off`.
#[derive(Debug, Clone)]
pub struct ChardevOptions {
    /// Chardev id.
    pub id: String,
    /// Socket path.
    pub path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChardevRaw {
    backend: String,
    id: String,
    path: PathBuf,
    #[serde(default)]
    server: Option<Flag>,
    #[serde(default)]
    wait: Option<Flag>,
}

/// Parses `--chardev` (only listening unix sockets: the monitor's transport).
pub fn parse_chardev(v: Value) -> Result<ChardevOptions, String> {
    let r: ChardevRaw = typed(v, "")?;
    if r.backend != "socket" {
        return Err(format!("chardev backend '{}' is not supported (only 'socket')", r.backend));
    }
    if r.server.is_some_and(|f| !f.0) {
        return Err("Parameter 'server': only server=on sockets are supported".into());
    }
    if r.wait.is_some_and(|f| f.0) {
        return Err("Parameter 'wait': wait=on is not supported; use wait=off".into());
    }
    Ok(ChardevOptions { id: r.id, path: r.path })
}

/// `--monitor [chardev=]ID[,mode=control][,pretty=on|off]`.
#[derive(Debug, Clone)]
pub struct MonitorOptions {
    /// The chardev to serve QMP on.
    pub chardev: String,
    /// Pretty-print JSON replies.
    pub pretty: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MonitorRaw {
    chardev: String,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    pretty: Option<Flag>,
}

/// Parses `--monitor`.
pub fn parse_monitor(v: Value) -> Result<MonitorOptions, String> {
    let r: MonitorRaw = typed(v, "")?;
    if r.mode.as_deref().is_some_and(|m| m != "control") {
        return Err("Parameter 'mode': only mode=control (QMP) is supported".into());
    }
    Ok(MonitorOptions { chardev: r.chardev, pretty: r.pretty.is_some_and(|f| f.0) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::keyval::parse_arg;

    #[test]
    fn qsd_export_lines_parse() {
        let v = parse_arg("type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=/run/vm.sock,writable=on,num-queues=4", None).unwrap();
        let ExportOptions::VhostUserBlk(o) = parse_export(v).unwrap() else { panic!("wrong type") };
        assert_eq!((o.num_queues, o.writable, o.logical_block_size), (4, true, 512));
        assert!(matches!(o.addr, SocketAddr::Unix(ref p) if p.to_str() == Some("/run/vm.sock")));
        assert!(o.cpu_affinity.is_empty());
        // cpu-affinity: a cpulist (commas doubled in the dotted form) or, in JSON (QMP), an array.
        let v = parse_arg("type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=/s,cpu-affinity=4-5,,1", None).unwrap();
        let ExportOptions::VhostUserBlk(o) = parse_export(v).unwrap() else { panic!("wrong type") };
        assert_eq!(o.cpu_affinity, vec![4, 5, 1]);
        let v = parse_arg(r#"{"type": "vhost-user-blk", "id": "e0", "node-name": "f0", "addr": {"type": "unix", "path": "/s"}, "cpu-affinity": [2, 0]}"#, None).unwrap();
        let ExportOptions::VhostUserBlk(o) = parse_export(v).unwrap() else { panic!("wrong type") };
        assert_eq!(o.cpu_affinity, vec![2, 0]);
        // Polling: adaptive by default, QEMU's iothread option names, or a fixed window.
        assert_eq!((o.poll_us, o.poll_max_ns, o.poll_grow, o.poll_shrink), (0, crate::vhost::config::DEFAULT_POLL_MAX_NS, 0, 0));
        let v = parse_arg("type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=/s,poll-max-ns=0", None).unwrap();
        let ExportOptions::VhostUserBlk(o) = parse_export(v).unwrap() else { panic!("wrong type") };
        assert_eq!((o.poll_us, o.poll_max_ns), (0, 0));
        let v = parse_arg("type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=/s,poll-max-ns=100000,poll-grow=4,poll-shrink=2", None).unwrap();
        let ExportOptions::VhostUserBlk(o) = parse_export(v).unwrap() else { panic!("wrong type") };
        assert_eq!((o.poll_max_ns, o.poll_grow, o.poll_shrink), (100_000, 4, 2));
        let v = parse_arg("type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=/s,poll-us=50", None).unwrap();
        let ExportOptions::VhostUserBlk(o) = parse_export(v).unwrap() else { panic!("wrong type") };
        assert_eq!(o.poll_us, 50);
        let v = parse_arg("type=nbd,id=n0,node-name=f0,name=disk", None).unwrap();
        let ExportOptions::Nbd(o) = parse_export(v).unwrap() else { panic!("wrong type") };
        assert_eq!((o.name.as_str(), o.writable), ("disk", false));
        let s = parse_nbd_server(parse_arg("addr.type=inet,addr.host=127.0.0.1,addr.port=10809,max-connections=4", None).unwrap()).unwrap();
        assert!(matches!(s.addr, SocketAddr::Inet { port: 10809, .. }));
        let c = parse_chardev(parse_arg("socket,id=m0,path=/tmp/q.sock,server=on,wait=off", Some("backend")).unwrap()).unwrap();
        assert_eq!(c.id, "m0");
        let m = parse_monitor(parse_arg("m0", Some("chardev")).unwrap()).unwrap();
        assert_eq!(m.chardev, "m0");
    }

    #[test]
    fn bad_export_lines_name_the_key() {
        let cases = [
            ("type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix", "'addr.path'"),
            ("type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=/x,num-queues=many", "'num-queues'"),
            ("type=vhost-user-blk,id=e0,node-name=f0,addr.type=tcp,addr.path=/x", "'addr.type'"),
            ("type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=/x,colour=red", "'colour'"),
            ("type=ftp,id=e0,node-name=f0", "'type'"),
            ("id=e0,node-name=f0", "'type'"),
            ("type=nbd,node-name=f0", "'id'"),
            ("type=nbd,id=e0,node-name=f0,writable=perhaps", "'writable'"),
            ("type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=/x,poll-us=50,poll-max-ns=1000", "'poll-us'"),
            ("type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=/x,poll-us=50,poll-shrink=2", "'poll-us'"),
            ("type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=/x,poll-max-ns=-1", "'poll-max-ns'"),
        ];
        for (line, want) in cases {
            let err = parse_export(parse_arg(line, None).unwrap()).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
        }
        let err = parse_nbd_server(parse_arg("addr.type=inet,addr.host=h,addr.port=99999", None).unwrap()).unwrap_err();
        assert!(err.contains("'addr.port'"), "{err}");
    }
}
