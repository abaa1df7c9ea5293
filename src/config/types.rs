//! Value types for options that arrive either as JSON (typed) or as dotted
//! `key=value` strings (everything a string): booleans, integers and sizes
//! accept both forms, so one serde struct parses both command-line syntaxes.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A boolean option: JSON `true`/`false`, or `on`/`off`, `yes`/`no`, `true`/`false`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flag(pub bool);

impl Flag {
    /// Parses the string forms QEMU's keyval parser accepts.
    pub fn parse(s: &str) -> Option<bool> {
        match s {
            "on" | "yes" | "true" => Some(true),
            "off" | "no" | "false" => Some(false),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Flag;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("'on' or 'off'")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Flag, E> {
                Ok(Flag(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Flag, E> {
                Flag::parse(v).map(Flag).ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// An unsigned integer: a JSON number or a decimal / `0x` hexadecimal string.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Num(pub u64);

/// A size in bytes: like [`Num`], and strings may carry a `k`, `M`, `G`, `T`,
/// `P` or `E` suffix (powers of 1024, as QEMU's size parser).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Size(pub u64);

fn parse_num(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses a size with an optional binary suffix (`4k`, `1G`, `512`).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return None,
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n = parse_num(digits)?;
    n.checked_mul(1u64 << shift)
}

struct NumVisitor {
    size: bool,
}

impl Visitor<'_> for NumVisitor {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.size {
            f.write_str("a size (a number with an optional k/M/G/T suffix)")
        } else {
            f.write_str("a non-negative integer")
        }
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        Err(E::invalid_value(de::Unexpected::Float(v), &self))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        let parsed = if self.size { parse_size(v) } else { parse_num(v) };
        parsed.ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
    }
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NumVisitor { size: false }).map(Num)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NumVisitor { size: true }).map(Size)
    }
}

/// The largest CPU number a `cpu_set_t` holds, plus one.
pub const MAX_CPUS: usize = libc::CPU_SETSIZE as usize;

/// A list of CPU numbers, in order: a Linux cpulist string (`2-5,8`; in the
/// dotted form a comma inside a value is doubled: `2-5,,8`), one number, or
/// a JSON array of numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuList(pub Vec<u16>);

impl CpuList {
    /// Parses a cpulist string: comma-separated CPU numbers and `A-B` ranges
    /// (A ≤ B), each below [`MAX_CPUS`]; at most [`MAX_CPUS`] entries.
    pub fn parse(s: &str) -> Result<CpuList, String> {
        let cpu = |t: &str| -> Result<u16, String> {
            match parse_num(t) {
                Some(n) if n < MAX_CPUS as u64 => Ok(n as u16),
                Some(n) => Err(format!("CPU {n} is beyond the largest CPU number, {}", MAX_CPUS - 1)),
                None => Err(format!("'{t}' is not a CPU number")),
            }
        };
        let mut out = Vec::new();
        for item in s.split(',') {
            let (a, b) = match item.split_once('-') {
                Some((a, b)) => (cpu(a)?, cpu(b)?),
                None => {
                    let c = cpu(item)?;
                    (c, c)
                }
            };
            if a > b {
                return Err(format!("the range '{item}' runs backwards"));
            }
            if out.len() + usize::from(b - a) + 1 > MAX_CPUS {
                return Err(format!("more than {MAX_CPUS} CPUs"));
            }
            out.extend(a..=b);
        }
        Ok(CpuList(out))
    }
}

impl fmt::Display for CpuList {
    /// The cpulist form, with runs of consecutive CPUs as ranges.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let mut i = 0;
        let v = &self.0;
        while i < v.len() {
            let mut j = i;
            while j + 1 < v.len() && v[j + 1] == v[j].wrapping_add(1) {
                j += 1;
            }
            let sep = if i == 0 { "" } else { "," };
            if j > i {
                write!(f, "{sep}{}-{}", v[i], v[j])?;
            } else {
                write!(f, "{sep}{}", v[i])?;
            }
            i = j + 1;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for CpuList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CpuList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a CPU list such as '2-5,8' or [2, 3]")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<CpuList, E> {
                CpuList::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<CpuList, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CpuList, E> {
                CpuList::parse(v).map_err(E::custom)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<CpuList, A::Error> {
                let mut out = Vec::new();
                while let Some(Num(n)) = seq.next_element()? {
                    if n >= MAX_CPUS as u64 || out.len() >= MAX_CPUS {
                        return Err(de::Error::custom(format!("CPU {n} is beyond the largest CPU number, {}, or the list is too long", MAX_CPUS - 1)));
                    }
                    out.push(n as u16);
                }
                Ok(CpuList(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_numbers_parse_in_both_forms() {
        let f: Flag = serde_json::from_str("\"on\"").unwrap();
        assert_eq!(f, Flag(true));
        let f: Flag = serde_json::from_str("false").unwrap();
        assert_eq!(f, Flag(false));
        assert!(serde_json::from_str::<Flag>("\"maybe\"").is_err());
        assert_eq!(serde_json::from_str::<Num>("\"0x10\"").unwrap(), Num(16));
        assert_eq!(serde_json::from_str::<Num>("7").unwrap(), Num(7));
        assert!(serde_json::from_str::<Num>("-1").is_err());
        assert_eq!(serde_json::from_str::<Size>("\"4k\"").unwrap(), Size(4096));
        assert_eq!(serde_json::from_str::<Size>("\"1G\"").unwrap(), Size(1 << 30));
        assert!(serde_json::from_str::<Size>("\"16E\"").is_err());
        assert!(serde_json::from_str::<Size>("\"12q\"").is_err());
    }

    #[test]
    fn cpu_lists_parse_in_every_form() {
        let list = |s: &str| serde_json::from_str::<CpuList>(s).map(|c| c.0);
        assert_eq!(list("\"2-5,8\"").unwrap(), vec![2, 3, 4, 5, 8]);
        assert_eq!(list("\"3,1\"").unwrap(), vec![3, 1], "order is kept: queue i takes the i-th CPU");
        assert_eq!(list("1").unwrap(), vec![1]);
        assert_eq!(list("[0, \"2\", 2]").unwrap(), vec![0, 2, 2]);
        for bad in ["\"5-2\"", "\"1,,2\"", "\"\"", "\"x\"", "\"1-\"", "\"1024\"", "[1024]", "-1", "\"0-70000\"", "true"] {
            assert!(list(bad).is_err(), "{bad} must be refused");
        }
        assert_eq!(CpuList(vec![0, 1, 2, 5, 7, 8]).to_string(), "0-2,5,7-8");
        assert_eq!(CpuList(vec![3]).to_string(), "3");
    }
}
