//! One client's QMP session: request checking, capabilities negotiation and
//! the built-in commands, independent of sockets and of the daemon.
//!
//! A session starts in negotiation mode, where only `qmp_capabilities` runs;
//! anything else gets QEMU's `CommandNotFound` "Expecting capabilities
//! negotiation with 'qmp_capabilities'". Requests are checked the way QEMU's
//! dispatcher checks them (an object; `execute` a string; `arguments` an
//! object; `id` anything, echoed back even in error replies; nothing else),
//! then the command parses its arguments completely before it acts.
//!
//! blkstack offers no capabilities (no out-of-band execution): commands run
//! one at a time, in order, per client; commands of different clients are
//! serialised by the server (QEMU's big lock plays that role there).

use std::sync::mpsc::Receiver;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{json, Map, Value};

use super::args::{self, NoArgs};
use super::error::QmpError;
use super::framing::Frame;

/// The QEMU release whose QMP commands and result shapes blkstack follows
/// (qemu-storage-daemon's subset); reported by the greeting and
/// `query-version`, where clients such as libvirt look for it.
pub const QEMU_VERSION: (u32, u32, u32) = (10, 0, 0);

/// The commands the session itself implements.
const BUILTIN: &[&str] = &["qmp_capabilities", "query-version", "query-commands", "quit"];

/// What executes the daemon's commands.
pub trait Backend: Send + Sync + 'static {
    /// The command names [`Backend::execute`] knows.
    fn commands(&self) -> Vec<&'static str>;
    /// Runs command `name`; `None` if there is no such command.
    fn execute(&self, name: &str, args: Map<String, Value>) -> Option<Result<Value, QmpError>>;
    /// A receiver of every event from now on (complete event objects).
    fn subscribe(&self) -> Receiver<Value>;
    /// Asks the daemon to shut down (after `quit` was answered).
    fn request_quit(&self);
}

/// A reply: `{"return": ..., "id": ...}` or `{"error": ..., "id": ...}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// The command's result.
    pub result: Result<Value, QmpError>,
    /// The request's `id`, if it had one.
    pub id: Option<Value>,
}

impl Serialize for Response {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        match &self.result {
            Ok(v) => m.serialize_entry("return", v)?,
            Err(e) => m.serialize_entry("error", e)?,
        }
        if let Some(id) = &self.id {
            m.serialize_entry("id", id)?;
        }
        m.end()
    }
}

/// What the server must do once the reply has been sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Nothing.
    Nothing,
    /// Start delivering events to this client.
    Negotiated,
    /// Ask the daemon to quit.
    Quit,
}

/// The state of one client.
#[derive(Debug, Default)]
pub struct Session {
    negotiated: bool,
}

/// The greeting sent when a client connects.
pub fn greeting() -> Value {
    json!({ "QMP": { "version": version(), "capabilities": [] } })
}

fn version() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({
        "qemu": { "major": major, "minor": minor, "micro": micro },
        "package": format!("blkstack {}", env!("CARGO_PKG_VERSION")),
    })
}

/// QEMU's `QMPCapability`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Capability {
    Oob,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CapabilitiesArgs {
    enable: Option<Vec<Capability>>,
}

/// A checked request.
struct Request {
    execute: String,
    arguments: Map<String, Value>,
}

/// QEMU's request checks, in its words.
fn check_request(v: Value) -> Result<Request, QmpError> {
    let Value::Object(obj) = v else { return Err(QmpError::generic("QMP input must be a JSON object")) };
    let mut execute = None;
    let mut arguments = Map::new();
    for (key, value) in obj {
        match key.as_str() {
            "execute" => match value {
                Value::String(s) => execute = Some(s),
                _ => return Err(QmpError::generic("QMP input member 'execute' must be a string")),
            },
            "arguments" => match value {
                Value::Object(m) => arguments = m,
                _ => return Err(QmpError::generic("QMP input member 'arguments' must be an object")),
            },
            "id" => {}
            other => return Err(QmpError::generic(format!("QMP input member '{other}' is unexpected"))),
        }
    }
    let execute = execute.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))?;
    Ok(Request { execute, arguments })
}

/// serde_json's message without its " at line L column C" tail.
fn parse_error(e: &serde_json::Error) -> QmpError {
    let msg = e.to_string();
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
    QmpError::generic(format!("JSON parse error, {msg}"))
}

impl Session {
    /// A session in negotiation mode.
    pub fn new() -> Self {
        Session::default()
    }

    /// Whether capabilities negotiation is complete.
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Answers one frame from the client.
    pub fn handle(&mut self, frame: Frame, backend: &dyn Backend) -> (Response, After) {
        let value = match frame {
            Frame::Garbage(msg) => return (Response { result: Err(QmpError::generic(format!("JSON parse error, {msg}"))), id: None }, After::Nothing),
            Frame::Message(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) => v,
                Err(e) => return (Response { result: Err(parse_error(&e)), id: None }, After::Nothing),
            },
        };
        let id = value.as_object().and_then(|o| o.get("id")).cloned();
        let (result, after) = match check_request(value) {
            Ok(req) => self.run(req, backend),
            Err(e) => (Err(e), After::Nothing),
        };
        (Response { result, id }, after)
    }

    fn run(&mut self, req: Request, backend: &dyn Backend) -> (Result<Value, QmpError>, After) {
        let Request { execute, arguments } = req;
        if !self.negotiated && execute != "qmp_capabilities" {
            return (Err(QmpError::command_not_found("Expecting capabilities negotiation with 'qmp_capabilities'")), After::Nothing);
        }
        match execute.as_str() {
            "qmp_capabilities" => self.capabilities(arguments),
            "query-version" => (args::parse::<NoArgs>(arguments).map(|_| version()), After::Nothing),
            "query-commands" => (args::parse::<NoArgs>(arguments).map(|_| commands(backend)), After::Nothing),
            "quit" => match args::parse::<NoArgs>(arguments) {
                Ok(_) => (Ok(json!({})), After::Quit),
                Err(e) => (Err(e), After::Nothing),
            },
            name => match backend.execute(name, arguments) {
                Some(r) => (r, After::Nothing),
                None => (Err(QmpError::command_not_found(format!("The command {name} has not been found"))), After::Nothing),
            },
        }
    }

    fn capabilities(&mut self, arguments: Map<String, Value>) -> (Result<Value, QmpError>, After) {
        let parsed = match args::parse::<CapabilitiesArgs>(arguments) {
            Ok(a) => a,
            Err(e) => return (Err(e), After::Nothing),
        };
        if self.negotiated {
            return (Err(QmpError::command_not_found("Capabilities negotiation is already complete, command ignored")), After::Nothing);
        }
        if let Some(Capability::Oob) = parsed.enable.as_deref().and_then(|l| l.first()) {
            return (Err(QmpError::generic("Capability oob not available")), After::Nothing);
        }
        self.negotiated = true;
        (Ok(json!({})), After::Negotiated)
    }
}

fn commands(backend: &dyn Backend) -> Value {
    let names = BUILTIN.iter().copied().chain(backend.commands());
    Value::Array(names.map(|n| json!({ "name": n })).collect())
}

/// serde_json's compact output with QEMU's spacing (`{"a": 1, "b": 2}`).
struct QemuCompact;

impl serde_json::ser::Formatter for QemuCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// One line of output (`pretty`: indented by four spaces, as QEMU), ending in CRLF.
pub fn encode<T: Serialize>(v: &T, pretty: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let r = if pretty {
        let mut ser = serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(b"    "));
        v.serialize(&mut ser)
    } else {
        let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuCompact);
        v.serialize(&mut ser)
    };
    if let Err(e) = r {
        // Only non-string map keys can fail, and our values have none.
        log::error!("cannot encode a QMP message: {e}");
        out.clear();
        out.extend_from_slice(br#"{"error": {"class": "GenericError", "desc": "internal error: unencodable reply"}}"#);
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Mutex;

    /// A backend with one command, `echo`, that returns its arguments, and
    /// `fail`, which fails with DeviceNotFound.
    #[derive(Default)]
    pub(crate) struct Echo {
        pub subscribers: Mutex<Vec<mpsc::Sender<Value>>>,
        pub quits: std::sync::atomic::AtomicUsize,
    }

    impl Echo {
        pub(crate) fn emit(&self, name: &str) {
            let ev = json!({"event": name, "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}});
            self.subscribers.lock().unwrap().retain(|s| s.send(ev.clone()).is_ok());
        }
    }

    impl Backend for Echo {
        fn commands(&self) -> Vec<&'static str> {
            vec!["echo", "fail", "emit"]
        }
        fn execute(&self, name: &str, args: Map<String, Value>) -> Option<Result<Value, QmpError>> {
            match name {
                "echo" => Some(Ok(Value::Object(args))),
                "fail" => Some(Err(QmpError { class: super::super::ErrorClass::DeviceNotFound, desc: "no".into() })),
                "emit" => {
                    self.emit("TEST_EVENT");
                    Some(Ok(json!({})))
                }
                _ => None,
            }
        }
        fn subscribe(&self) -> Receiver<Value> {
            let (tx, rx) = mpsc::channel();
            self.subscribers.lock().unwrap().push(tx);
            rx
        }
        fn request_quit(&self) {
            self.quits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn ask(s: &mut Session, b: &Echo, text: &str) -> (Value, After) {
        let (r, after) = s.handle(Frame::Message(text.as_bytes().to_vec()), b);
        (serde_json::to_value(&r).unwrap(), after)
    }

    fn error(class: &str, desc: &str) -> Value {
        json!({"error": {"class": class, "desc": desc}})
    }

    #[test]
    fn negotiation_comes_first() {
        let (b, mut s) = (Echo::default(), Session::new());
        let want = json!({"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1});
        assert_eq!(ask(&mut s, &b, r#"{"execute": "echo", "id": 1}"#).0, want);
        let (v, _) = ask(&mut s, &b, r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#);
        assert_eq!(v, error("GenericError", "Capability oob not available"));
        let (v, _) = ask(&mut s, &b, r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}}"#);
        assert_eq!(v, error("GenericError", "Parameter 'null' does not accept value 'x'"));
        assert!(!s.negotiated());
        let (v, after) = ask(&mut s, &b, r#"{"execute": "qmp_capabilities", "id": "a"}"#);
        assert_eq!((v, after), (json!({"return": {}, "id": "a"}), After::Negotiated));
        let (v, after) = ask(&mut s, &b, r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!((v, after), (error("CommandNotFound", "Capabilities negotiation is already complete, command ignored"), After::Nothing));
    }

    #[test]
    fn requests_are_checked_like_qemu() {
        let (b, mut s) = (Echo::default(), Session::new());
        ask(&mut s, &b, r#"{"execute": "qmp_capabilities"}"#);
        let cases = [
            (r#"[1]"#, "QMP input must be a JSON object", None),
            (r#""abc""#, "QMP input must be a JSON object", None),
            (r#"{"execute": 1, "id": 9}"#, "QMP input member 'execute' must be a string", Some(json!(9))),
            (r#"{"id": [9]}"#, "QMP input lacks member 'execute'", Some(json!([9]))),
            (r#"{"execute": "echo", "arguments": [], "id": 3}"#, "QMP input member 'arguments' must be an object", Some(json!(3))),
            (r#"{"execute": "echo", "x": 1}"#, "QMP input member 'x' is unexpected", None),
            (r#"{"exec-oob": "echo"}"#, "QMP input member 'exec-oob' is unexpected", None),
            (r#"{"execute": "query-version", "arguments": {"a": 1}}"#, "Parameter 'a' is unexpected", None),
            (r#"{"execute": "quit", "arguments": {"a": 1}}"#, "Parameter 'a' is unexpected", None),
        ];
        for (text, desc, id) in cases {
            let mut want = error("GenericError", desc);
            if let Some(id) = id {
                want["id"] = id;
            }
            assert_eq!(ask(&mut s, &b, text).0, want, "{text}");
        }
        let (v, _) = ask(&mut s, &b, r#"{"execute": "nope", "id": {"a": [1]}}"#);
        assert_eq!(v, json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": {"a": [1]}}));
        let (v, _) = ask(&mut s, &b, r#"{"execute": "fail"}"#);
        assert_eq!(v, error("DeviceNotFound", "no"));
        let (v, _) = ask(&mut s, &b, r#"{"execute": "echo", "arguments": {"k": [1, "x"]}, "id": 5}"#);
        assert_eq!(v, json!({"return": {"k": [1, "x"]}, "id": 5}));
        let (r, _) = s.handle(Frame::Message(b"{\"execute\": }".to_vec()), &b);
        assert!(matches!(r.result, Err(ref e) if e.desc.starts_with("JSON parse error, ")), "{r:?}");
        let (r, _) = s.handle(Frame::Garbage("stray '}'".into()), &b);
        assert_eq!(r.result, Err(QmpError::generic("JSON parse error, stray '}'")));
    }

    #[test]
    fn builtin_commands() {
        let (b, mut s) = (Echo::default(), Session::new());
        ask(&mut s, &b, r#"{"execute": "qmp_capabilities"}"#);
        let (v, _) = ask(&mut s, &b, r#"{"execute": "query-version"}"#);
        assert_eq!(v["return"]["qemu"]["major"], json!(QEMU_VERSION.0));
        assert!(v["return"]["package"].as_str().is_some_and(|p| p.starts_with("blkstack ")));
        assert_eq!(greeting()["QMP"]["version"], v["return"]);
        let (v, _) = ask(&mut s, &b, r#"{"execute": "query-commands"}"#);
        let names: Vec<&str> = v["return"].as_array().unwrap().iter().filter_map(|c| c["name"].as_str()).collect();
        assert_eq!(names, ["qmp_capabilities", "query-version", "query-commands", "quit", "echo", "fail", "emit"]);
        let (v, after) = ask(&mut s, &b, r#"{"execute": "quit", "id": 1}"#);
        assert_eq!((v, after), (json!({"return": {}, "id": 1}), After::Quit));
    }

    #[test]
    fn encoding_spacing_and_pretty() {
        let r = Response { result: Ok(json!({"a": [1, 2]})), id: Some(json!("x")) };
        assert_eq!(encode(&r, false), b"{\"return\": {\"a\": [1, 2]}, \"id\": \"x\"}\r\n");
        let pretty = String::from_utf8(encode(&r, true)).unwrap();
        assert!(pretty.starts_with("{\n    \"return\": {\n        \"a\": ["), "{pretty}");
        assert!(pretty.ends_with("}\r\n"));
    }
}
