//! Command arguments: a JSON object into a typed struct, with QEMU's messages.
//!
//! Every command declares its arguments as a `#[serde(deny_unknown_fields)]`
//! struct and parses them with [`parse`] before it touches anything. QMP is
//! strict where the command line is lenient: an integer is a JSON number, a
//! boolean is `true`/`false`. Errors name the full key the way QEMU's input
//! visitor does:
//!
//! - `Parameter 'size' is missing`
//! - `Parameter 'foo' is unexpected`
//! - `Invalid parameter type for 'size', expected: integer`
//! - `Parameter 'mode' does not accept value 'soft'` (QEMU names only the
//!   member itself here, and `null` for a list element)
//! - `Parameter 'max-connections' expects uint32` (out of range)

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::QmpError;

/// Parses `args` into `T`.
pub fn parse<T: DeserializeOwned>(args: Map<String, Value>) -> Result<T, QmpError> {
    parse_value(Value::Object(args))
}

/// Parses the nested object `v`, found at key `prefix`, into `T`.
///
/// Nested objects are declared as `Map<String, Value>` fields and parsed in a
/// second step with this function: serde's derived structs would also accept
/// a JSON array of the right length, which QMP does not.
pub fn parse_at<T: DeserializeOwned>(prefix: &str, v: Map<String, Value>) -> Result<T, QmpError> {
    serde_path_to_error::deserialize(Value::Object(v)).map_err(|e| {
        let path = e.path().to_string();
        let full = if path == "." { prefix.to_string() } else { format!("{prefix}.{path}") };
        describe(&full, &e.inner().to_string())
    })
}

fn parse_value<T: DeserializeOwned>(v: Value) -> Result<T, QmpError> {
    serde_path_to_error::deserialize(v).map_err(|e| describe(&e.path().to_string(), &e.inner().to_string()))
}

/// `a.b` from serde_path_to_error's `a.b` / `.` / `a[0]` forms.
fn key_of(path: &str) -> String {
    if path == "." {
        String::new()
    } else {
        path.to_string()
    }
}

fn join(path: &str, field: &str) -> String {
    let p = key_of(path);
    if p.is_empty() {
        field.to_string()
    } else if p == field || p.ends_with(&format!(".{field}")) {
        p
    } else {
        format!("{p}.{field}")
    }
}

/// Between the first pair of backticks.
fn quoted(msg: &str) -> Option<&str> {
    msg.split('`').nth(1)
}

/// The last member name of a path, `null` for a list element (as QEMU).
fn last_member(path: &str) -> String {
    let p = key_of(path);
    if p.ends_with(']') {
        return "null".into();
    }
    p.rsplit('.').next().unwrap_or("").to_string()
}

/// QEMU's name for what serde expected.
fn qapi_type(expected: &str) -> &'static str {
    let e = expected.trim();
    match e {
        "i8" | "i16" | "i32" | "i64" | "i128" | "u8" | "u16" | "u32" | "u64" | "u128" | "an integer" => "integer",
        "f32" | "f64" | "a number" => "number",
        "a boolean" => "boolean",
        "a string" | "a borrowed string" | "a character" => "string",
        "a sequence" => "array",
        _ if e.starts_with("struct ") || e == "a map" => "object",
        _ if e.starts_with("enum ") || e.contains("variant") => "string",
        "string or map" => "string",
        _ => "value of another type",
    }
}

/// QEMU's range names for the integer types ("uint32" for u32, ...).
fn range_name(expected: &str) -> String {
    match expected.trim() {
        "u8" => "uint8".into(),
        "u16" => "uint16".into(),
        "u32" => "uint32".into(),
        "u64" => "uint64".into(),
        "i8" => "int8".into(),
        "i16" => "int16".into(),
        "i32" => "int32".into(),
        "i64" => "int64".into(),
        other => other.to_string(),
    }
}

/// Turns a serde error at `path` into QEMU's wording.
pub fn describe(path: &str, msg: &str) -> QmpError {
    let msg = msg.split(" at line ").next().unwrap_or(msg);
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        let field = quoted(rest).unwrap_or("");
        return QmpError::generic(format!("Parameter '{}' is unexpected", join(path, field)));
    }
    if let Some(rest) = msg.strip_prefix("missing field ") {
        return QmpError::missing(&join(path, quoted(rest).unwrap_or("")));
    }
    if let Some(rest) = msg.strip_prefix("unknown variant ") {
        let value = quoted(rest).unwrap_or("");
        return QmpError::generic(format!("Parameter '{}' does not accept value '{value}'", last_member(path)));
    }
    let key = key_of(path);
    if msg.starts_with("invalid type: ") {
        let expected = msg.rsplit(", expected ").next().unwrap_or("");
        return QmpError::wrong_type(&key, qapi_type(expected));
    }
    if msg.starts_with("invalid value: ") {
        let expected = msg.rsplit(", expected ").next().unwrap_or("");
        return QmpError::expects(&key, &range_name(expected));
    }
    // A custom message from a field's own deserializer.
    if key.is_empty() {
        QmpError::generic(msg.to_string())
    } else {
        QmpError::generic(format!("Parameter '{key}': {msg}"))
    }
}

/// Commands that take no arguments.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Safe,
        Hard,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct Inner {
        path: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    #[allow(dead_code)]
    struct Args {
        size: i64,
        node_name: Option<String>,
        mode: Option<Mode>,
        flat: Option<bool>,
        max_connections: Option<u32>,
        data: Option<Map<String, Value>>,
        list: Option<Vec<Mode>>,
    }

    fn err(v: Value) -> String {
        let Value::Object(m) = v else { unreachable!("test input is an object") };
        parse::<Args>(m).map(|_| ()).unwrap_err().desc
    }

    #[test]
    fn messages_match_qemu() {
        let cases = [
            (json!({}), "Parameter 'size' is missing"),
            (json!({"size": 1, "foo": 2}), "Parameter 'foo' is unexpected"),
            (json!({"size": "1"}), "Invalid parameter type for 'size', expected: integer"),
            (json!({"size": 1.5}), "Invalid parameter type for 'size', expected: integer"),
            (json!({"size": 1e22}), "Invalid parameter type for 'size', expected: integer"),
            (json!({"size": 1, "node-name": 3}), "Invalid parameter type for 'node-name', expected: string"),
            (json!({"size": 1, "flat": "yes"}), "Invalid parameter type for 'flat', expected: boolean"),
            (json!({"size": 1, "mode": "soft"}), "Parameter 'mode' does not accept value 'soft'"),
            (json!({"size": 1, "mode": 1}), "Invalid parameter type for 'mode', expected: string"),
            (json!({"size": 1, "list": ["safe", "x"]}), "Parameter 'null' does not accept value 'x'"),
            (json!({"size": 1, "list": "safe"}), "Invalid parameter type for 'list', expected: array"),
            (json!({"size": 1, "max-connections": -1}), "Parameter 'max-connections' expects uint32"),
            (json!({"size": 1, "data": []}), "Invalid parameter type for 'data', expected: object"),
        ];
        for (input, want) in cases {
            assert_eq!(err(input.clone()), want, "input {input}");
        }
        let nested = [
            (json!({}), "Parameter 'addr.data.path' is missing"),
            (json!({"path": "p", "x": 1}), "Parameter 'addr.data.x' is unexpected"),
            (json!({"path": 1}), "Invalid parameter type for 'addr.data.path', expected: string"),
        ];
        for (input, want) in nested {
            let Value::Object(m) = input.clone() else { unreachable!("test input is an object") };
            assert_eq!(parse_at::<Inner>("addr.data", m).unwrap_err().desc, want, "input {input}");
        }
    }

    #[test]
    fn good_arguments_parse() {
        let Value::Object(m) = json!({"size": 7, "mode": "hard", "data": {"path": "/p"}}) else { unreachable!() };
        let a: Args = parse(m).unwrap();
        let inner: Inner = parse_at("data", a.data.unwrap()).unwrap();
        assert_eq!((a.size, a.mode, inner.path), (7, Some(Mode::Hard), "/p".to_string()));
        assert!(parse::<NoArgs>(Map::new()).is_ok());
        let Value::Object(m) = json!({"x": null}) else { unreachable!() };
        assert_eq!(parse::<NoArgs>(m).unwrap_err().desc, "Parameter 'x' is unexpected");
    }
}
