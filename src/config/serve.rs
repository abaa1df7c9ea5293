//! The whole `blkstack serve` configuration: command-line options and
//! `--config FILE`, parsed and checked before anything starts.

use std::path::PathBuf;

use serde_json::Value;

use super::export::{parse_chardev, parse_export, parse_monitor, parse_nbd_server, ChardevOptions, ExportOptions, MonitorOptions, NbdServerOptions};
use super::keyval::parse_arg;

/// `blkstack serve` options, in qemu-storage-daemon's syntax.
#[derive(Debug, Default, clap::Args)]
#[command(after_help = "Each definition takes QEMU's dotted key=value form or a JSON object.\n\
Examples:\n  blkstack serve --blockdev driver=file,node-name=disk0,filename=vm.img \\\n      \
--export type=vhost-user-blk,id=e0,node-name=disk0,addr.type=unix,addr.path=/run/vm.sock,writable=on,num-queues=4\n  \
blkstack serve --config /etc/blkstack/vm.json")]
pub struct ServeArgs {
    /// A block node: driver=file|raw|null-co|null-aio,node-name=NAME,... (file: filename, aio=io_uring|threads|native,
    /// locking=on|off|auto; raw: file=NODE or file.driver=..., offset, size; null-co: size, read-zeroes, latency-ns;
    /// all: read-only, auto-read-only, force-share, discard=ignore|unmap, detect-zeroes=off|on|unmap, cache.direct, cache.no-flush).
    #[arg(long = "blockdev", value_name = "OPTIONS")]
    pub blockdev: Vec<String>,
    /// An export: type=vhost-user-blk,id=ID,node-name=NODE,addr.type=unix,addr.path=PATH[,writable=on][,num-queues=N]
    /// [,logical-block-size=512][,queue-size=256][,serial=S][,poll-max-ns=65536][,poll-grow=0][,poll-shrink=0 | ,poll-us=N][,cpu-affinity=CPUS]  or  type=nbd,id=ID,node-name=NODE[,name=NAME]
    /// [,description=TEXT][,writable=on] (needs --nbd-server).
    #[arg(long = "export", value_name = "OPTIONS")]
    pub export: Vec<String>,
    /// The NBD server: addr.type=unix,addr.path=PATH or addr.type=inet,addr.host=HOST,addr.port=PORT[,max-connections=N].
    #[arg(long = "nbd-server", value_name = "OPTIONS")]
    pub nbd_server: Option<String>,
    /// A character device for a monitor: socket,id=ID,path=PATH,server=on,wait=off.
    #[arg(long = "chardev", value_name = "OPTIONS")]
    pub chardev: Vec<String>,
    /// A QMP monitor: [chardev=]ID[,mode=control][,pretty=on|off].
    #[arg(long = "monitor", value_name = "OPTIONS")]
    pub monitor: Vec<String>,
    /// Write the daemon's PID to this file (removed on exit).
    #[arg(long = "pidfile", value_name = "PATH")]
    pub pidfile: Option<PathBuf>,
    /// Detach once every export is up; the parent exits 0 only then.
    #[arg(long = "daemonize")]
    pub daemonize: bool,
    /// A JSON file: {"blockdev": [...], "export": [...], "nbd-server": {...}, "chardev": [...], "monitor": [...], "pidfile": "..."}.
    #[arg(long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Everything `serve` will set up, in order.
#[derive(Debug, Default)]
pub struct ServeConfig {
    /// Block node definitions (checked when added, before any export starts).
    pub blockdevs: Vec<Value>,
    /// The NBD server.
    pub nbd_server: Option<NbdServerOptions>,
    /// Exports.
    pub exports: Vec<ExportOptions>,
    /// Chardevs for monitors.
    pub chardevs: Vec<ChardevOptions>,
    /// QMP monitors.
    pub monitors: Vec<MonitorOptions>,
    /// PID file.
    pub pidfile: Option<PathBuf>,
    /// Detach.
    pub daemonize: bool,
}

fn with_ctx<T>(opt: &str, i: usize, r: Result<T, String>) -> Result<T, String> {
    r.map_err(|e| format!("--{opt} #{}: {e}", i + 1))
}

fn list(v: Value, key: &str) -> Result<Vec<Value>, String> {
    match v {
        Value::Array(a) => Ok(a),
        o @ Value::Object(_) => Ok(vec![o]),
        _ => Err(format!("config key '{key}' expects a list of objects")),
    }
}

impl ServeConfig {
    /// Parses the command line and the config file (its entries come first).
    pub fn from_args(args: &ServeArgs) -> Result<ServeConfig, String> {
        let mut raw: Vec<(&'static str, Value)> = Vec::new();
        let mut cfg = ServeConfig { daemonize: args.daemonize, pidfile: args.pidfile.clone(), ..Default::default() };
        if let Some(path) = &args.config {
            let text = std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| format!("--config {}: invalid JSON: {e}", path.display()))?;
            let Value::Object(obj) = v else { return Err(format!("--config {}: expected a JSON object", path.display())) };
            for (k, v) in obj {
                let key: &'static str = match k.as_str() {
                    "blockdev" => "blockdev",
                    "export" => "export",
                    "nbd-server" => "nbd-server",
                    "chardev" => "chardev",
                    "monitor" => "monitor",
                    "pidfile" => {
                        let p = v.as_str().ok_or("--config: 'pidfile' expects a string")?;
                        cfg.pidfile.get_or_insert_with(|| PathBuf::from(p));
                        continue;
                    }
                    other => return Err(format!("--config {}: unknown key '{other}' (expected blockdev, export, nbd-server, chardev, monitor, pidfile)", path.display())),
                };
                for item in list(v, key)? {
                    raw.push((key, item));
                }
            }
        }
        let cli: [(&'static str, &[String], Option<&str>); 4] =
            [("blockdev", &args.blockdev, None), ("export", &args.export, None), ("chardev", &args.chardev, Some("backend")), ("monitor", &args.monitor, Some("chardev"))];
        for (key, items, implied) in cli {
            for (i, s) in items.iter().enumerate() {
                raw.push((key, with_ctx(key, i, parse_arg(s, implied))?));
            }
        }
        if let Some(s) = &args.nbd_server {
            raw.push(("nbd-server", with_ctx("nbd-server", 0, parse_arg(s, None))?));
        }
        for (key, v) in raw {
            let ctx = |e: String| format!("--{key}: {e}");
            match key {
                "blockdev" => cfg.blockdevs.push(v),
                "export" => cfg.exports.push(parse_export(v).map_err(ctx)?),
                "chardev" => cfg.chardevs.push(parse_chardev(v).map_err(ctx)?),
                "monitor" => cfg.monitors.push(parse_monitor(v).map_err(ctx)?),
                _ => {
                    if cfg.nbd_server.is_some() {
                        return Err("--nbd-server given more than once".into());
                    }
                    cfg.nbd_server = Some(parse_nbd_server(v).map_err(ctx)?);
                }
            }
        }
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        let mut ids: Vec<&str> = Vec::new();
        for e in &self.exports {
            if ids.contains(&e.id()) {
                return Err(format!("--export: duplicate export id '{}'", e.id()));
            }
            ids.push(e.id());
            if matches!(e, ExportOptions::Nbd(_)) && self.nbd_server.is_none() {
                return Err(format!("--export id={}: an NBD export needs --nbd-server", e.id()));
            }
        }
        for m in &self.monitors {
            if !self.chardevs.iter().any(|c| c.id == m.chardev) {
                return Err(format!("--monitor: chardev '{}' not found", m.chardev));
            }
        }
        Ok(())
    }
}
