//! QEMU's `key=value,...` option syntax, turned into a JSON tree.
//!
//! Dotted keys make nested objects (`file.driver=file` becomes
//! `{"file": {"driver": "file"}}`), a doubled comma is a literal comma inside
//! a value, and an option may have an implied first key (`--monitor m0` is
//! `--monitor chardev=m0`). Every value stays a string; the typed structs
//! accept strings where they expect numbers or booleans. An argument that
//! starts with `{` is JSON and is used as it is.

use serde_json::{Map, Value};

/// Parses one option argument in either syntax.
pub fn parse_arg(arg: &str, implied_key: Option<&str>) -> Result<Value, String> {
    let trimmed = arg.trim_start();
    if trimmed.starts_with('{') {
        let v: Value = serde_json::from_str(trimmed).map_err(|e| format!("invalid JSON: {e}"))?;
        if !v.is_object() {
            return Err("the JSON form must be an object".into());
        }
        return Ok(v);
    }
    parse_keyval(arg, implied_key)
}

/// Splits at single commas; `,,` is a literal comma.
fn split_pairs(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// Parses the dotted `key=value` form.
pub fn parse_keyval(s: &str, implied_key: Option<&str>) -> Result<Value, String> {
    let mut root = Map::new();
    for (i, pair) in split_pairs(s).into_iter().enumerate() {
        if pair.is_empty() {
            if i == 0 && s.is_empty() {
                break;
            }
            return Err(format!("empty parameter in '{s}'"));
        }
        let (key, value) = match pair.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match (i, implied_key) {
                (0, Some(k)) => (k.to_string(), pair),
                _ => return Err(format!("Expected '=' after parameter '{pair}'")),
            },
        };
        insert(&mut root, &key, value)?;
    }
    Ok(Value::Object(root))
}

fn insert(root: &mut Map<String, Value>, key: &str, value: String) -> Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')) {
        return Err(format!("Invalid parameter '{key}'"));
    }
    let mut map = root;
    for (depth, part) in parts.iter().enumerate() {
        let prefix = parts[..=depth].join(".");
        if depth + 1 == parts.len() {
            if map.contains_key(*part) {
                return Err(format!("Parameter '{prefix}' is set more than once or used inconsistently"));
            }
            map.insert(part.to_string(), Value::String(value));
            return Ok(());
        }
        let entry = map.entry(part.to_string()).or_insert_with(|| Value::Object(Map::new()));
        map = match entry {
            Value::Object(m) => m,
            _ => return Err(format!("Parameter '{prefix}' is used both as a value and as an object")),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dotted_keys_nest() {
        let v = parse_arg("driver=raw,node-name=r0,file.driver=file,file.filename=/a,,b", None).unwrap();
        assert_eq!(v, json!({"driver": "raw", "node-name": "r0", "file": {"driver": "file", "filename": "/a,b"}}));
    }

    #[test]
    fn implied_key_and_json() {
        assert_eq!(parse_arg("m0", Some("chardev")).unwrap(), json!({"chardev": "m0"}));
        assert_eq!(parse_arg(r#"{"driver": "null-co", "size": 5}"#, None).unwrap(), json!({"driver": "null-co", "size": 5}));
        assert!(parse_arg("[1]", None).is_err());
    }

    /// A random option tree: keys of QEMU's characters, values with commas,
    /// equals signs, dots, spaces and non-ASCII, objects up to three deep.
    fn random_tree(rng: &mut rand::rngs::StdRng, depth: u32) -> Map<String, Value> {
        use rand::Rng;
        let key_chars: Vec<char> = "abcxyz09-_".chars().collect();
        let value_chars: Vec<char> = "ab,=. é{}\"x1".chars().collect();
        let mut m = Map::new();
        for _ in 0..rng.gen_range(1..4) {
            let key: String = (0..rng.gen_range(1..4)).map(|_| key_chars[rng.gen_range(0..key_chars.len())]).collect();
            let v = if depth < 2 && rng.gen_bool(0.3) {
                Value::Object(random_tree(rng, depth + 1))
            } else {
                Value::String((0..rng.gen_range(0..6)).map(|_| value_chars[rng.gen_range(0..value_chars.len())]).collect())
            };
            m.insert(key, v);
        }
        m
    }

    /// The `key=value` form of `tree` (dotted keys, doubled commas).
    fn render(tree: &Map<String, Value>, prefix: &str, out: &mut Vec<String>) {
        for (k, v) in tree {
            let key = format!("{prefix}{k}");
            match v {
                Value::Object(m) => render(m, &format!("{key}."), out),
                Value::String(s) => out.push(format!("{key}={}", s.replace(',', ",,"))),
                _ => unreachable!("the generator makes objects and strings"),
            }
        }
    }

    #[test]
    fn random_option_trees_come_back_from_their_keyval_form() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b65_7976);
        for _ in 0..2000 {
            let tree = random_tree(&mut rng, 0);
            let mut pairs = Vec::new();
            render(&tree, "", &mut pairs);
            let line = pairs.join(",");
            assert_eq!(parse_arg(&line, None), Ok(Value::Object(tree.clone())), "{line}");
        }
    }

    #[test]
    fn random_junk_is_parsed_or_refused() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6a75_6e6b);
        let chars: Vec<char> = "a.=,{}\"[]: 1é\u{0}".chars().collect();
        fn strings_only(v: &Value) -> bool {
            match v {
                Value::Object(m) => m.values().all(strings_only),
                Value::String(_) => true,
                _ => false,
            }
        }
        for _ in 0..5000 {
            let line: String = (0..rng.gen_range(0..24)).map(|_| chars[rng.gen_range(0..chars.len())]).collect();
            match parse_arg(&line, if rng.gen_bool(0.3) { Some("chardev") } else { None }) {
                Ok(v) if line.trim_start().starts_with('{') => assert!(v.is_object(), "{line:?}"),
                Ok(v) => assert!(v.is_object() && strings_only(&v), "{line:?} -> {v}"),
                Err(e) => assert!(!e.is_empty(), "{line:?}"),
            }
        }
    }

    #[test]
    fn conflicts_and_junk_are_refused() {
        assert!(parse_arg("file=f0,file.driver=file", None).unwrap_err().contains("'file'"));
        assert!(parse_arg("a=1,a=2", None).unwrap_err().contains("'a'"));
        assert!(parse_arg("novalue", None).unwrap_err().contains("novalue"));
        assert!(parse_arg("a..b=1", None).is_err());
        assert!(parse_arg("a=1,,", None).is_ok());
        assert!(parse_arg("a=1,", None).is_err());
    }
}
