//! Splits the byte stream a QMP client sends into JSON messages.
//!
//! QMP has no framing besides JSON itself: a message ends where its
//! outermost object (or array) closes, newlines mean nothing, and several
//! messages may arrive in one read or one message across many. Like QEMU's
//! JSON streamer, the splitter only tracks strings and bracket depth; the
//! complete text is then parsed by `serde_json`, so a malformed message costs
//! one error reply and the stream resynchronises at the next top-level value.
//!
//! Memory is bounded: a message longer than the limit (see
//! [`Splitter::new`]) is an error the connection does not survive, since the
//! rest of that message cannot be told apart from new ones.

/// What the splitter found in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The complete text of one top-level JSON value (still to be parsed).
    Message(Vec<u8>),
    /// Bytes that cannot start a JSON value; the text is QEMU's error detail
    /// (the reply reads "JSON parse error, " followed by it).
    Garbage(String),
}

/// The message exceeded the size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge(pub usize);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between messages.
    Idle,
    /// Inside an object or array (`depth` ≥ 1).
    Nested,
    /// A top-level string.
    TopString,
    /// A top-level bare word (number, keyword or junk).
    Word,
}

/// The incremental splitter for one connection.
#[derive(Debug)]
pub struct Splitter {
    buf: Vec<u8>,
    state: State,
    depth: usize,
    in_string: bool,
    escaped: bool,
    max: usize,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn ends_word(b: u8) -> bool {
    is_ws(b) || matches!(b, b'{' | b'}' | b'[' | b']' | b'"' | b',' | b':')
}

impl Splitter {
    /// A splitter that refuses messages longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Splitter { buf: Vec::new(), state: State::Idle, depth: 0, in_string: false, escaped: false, max }
    }

    /// Feeds bytes; complete frames are appended to `out` in stream order.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Frame>) -> Result<(), TooLarge> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.state {
                State::Idle => self.start(b, out),
                State::Nested => self.nested(b, out),
                State::TopString => self.top_string(b, out),
                State::Word => {
                    if ends_word(b) {
                        self.finish_word(out);
                        continue; // the delimiter starts the next frame
                    }
                    self.buf.push(b);
                }
            }
            if self.buf.len() > self.max {
                return Err(TooLarge(self.max));
            }
            i += 1;
        }
        Ok(())
    }

    fn start(&mut self, b: u8, out: &mut Vec<Frame>) {
        match b {
            _ if is_ws(b) => {}
            b'{' | b'[' => {
                self.buf.push(b);
                self.depth = 1;
                self.state = State::Nested;
            }
            b'"' => {
                self.buf.push(b);
                self.state = State::TopString;
            }
            b'}' | b']' | b',' | b':' => out.push(Frame::Garbage(format!("stray '{}'", b as char))),
            _ => {
                self.buf.push(b);
                self.state = State::Word;
            }
        }
    }

    fn nested(&mut self, b: u8, out: &mut Vec<Frame>) {
        self.buf.push(b);
        if self.in_string {
            self.string_byte(b);
            return;
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    self.emit(out);
                }
            }
            _ => {}
        }
    }

    fn top_string(&mut self, b: u8, out: &mut Vec<Frame>) {
        self.buf.push(b);
        let was_escaped = self.escaped;
        self.string_byte(b);
        if b == b'"' && !was_escaped {
            self.emit(out);
        }
    }

    /// Tracks escapes inside a string; clears `in_string` at the closing quote.
    fn string_byte(&mut self, b: u8) {
        if self.escaped {
            self.escaped = false;
        } else if b == b'\\' {
            self.escaped = true;
        } else if b == b'"' {
            self.in_string = false;
        }
    }

    fn finish_word(&mut self, out: &mut Vec<Frame>) {
        let word = std::mem::take(&mut self.buf);
        self.state = State::Idle;
        if serde_json::from_slice::<serde_json::Value>(&word).is_ok() {
            out.push(Frame::Message(word));
            return;
        }
        let text = String::from_utf8_lossy(&word);
        let first = text.chars().next().unwrap_or('?');
        let msg = if first.is_ascii_alphabetic() {
            let shown: String = text.chars().take(32).collect();
            format!("invalid keyword '{shown}'")
        } else {
            format!("stray '{first}'")
        };
        out.push(Frame::Garbage(msg));
    }

    fn emit(&mut self, out: &mut Vec<Frame>) {
        out.push(Frame::Message(std::mem::take(&mut self.buf)));
        self.state = State::Idle;
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<Frame> {
        let mut s = Splitter::new(1024);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out).unwrap();
        }
        out
    }

    fn msg(s: &str) -> Frame {
        Frame::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn messages_end_where_their_object_closes() {
        let out = split(&[b"{\"execute\": \"a\"}{\"execute\":", b" \"b\", \"id\": [1, {}]}\r\n  [1]"]);
        assert_eq!(out, vec![msg("{\"execute\": \"a\"}"), msg("{\"execute\": \"b\", \"id\": [1, {}]}"), msg("[1]")]);
    }

    #[test]
    fn brackets_and_quotes_inside_strings_do_not_count() {
        let out = split(&[br#"{"a": "}]\"{", "b": "\\"}"#, b"\n"]);
        assert_eq!(out, vec![msg(r#"{"a": "}]\"{", "b": "\\"}"#)]);
        // Split in the middle of an escape.
        let out = split(&[br#"{"a": "x\"#, br#"" }"}"#]);
        assert_eq!(out, vec![msg(r#"{"a": "x\" }"}"#)]);
    }

    #[test]
    fn top_level_scalars_and_junk() {
        let out = split(&[b"\"abc\" 12 true foo \x01 } {}"]);
        assert_eq!(
            out,
            vec![
                msg("\"abc\""),
                msg("12"),
                msg("true"),
                Frame::Garbage("invalid keyword 'foo'".into()),
                Frame::Garbage("stray '\u{1}'".into()),
                Frame::Garbage("stray '}'".into()),
                msg("{}"),
            ]
        );
        // A word ends at a bracket, which then starts the next frame.
        assert_eq!(split(&[b"nul{}"]), vec![Frame::Garbage("invalid keyword 'nul'".into()), msg("{}")]);
    }

    #[test]
    fn an_incomplete_message_waits_for_more() {
        let mut s = Splitter::new(1024);
        let mut out = Vec::new();
        s.feed(b"{\"execute\": \"a\"\n", &mut out).unwrap();
        assert!(out.is_empty());
        s.feed(b"}", &mut out).unwrap();
        assert_eq!(out, vec![msg("{\"execute\": \"a\"\n}")]);
    }

    #[test]
    fn oversized_messages_are_refused_whitespace_is_not_buffered() {
        let mut s = Splitter::new(16);
        let mut out = Vec::new();
        s.feed(&[b' '; 100], &mut out).unwrap();
        assert_eq!(s.feed(b"{\"aaaaaaaaaaaaaaaaaaaa", &mut out), Err(TooLarge(16)));
        let mut s = Splitter::new(16);
        assert_eq!(s.feed(&[b'7'; 17], &mut out), Err(TooLarge(16)));
        let mut s = Splitter::new(16);
        s.feed(b"{\"a\": \"0123456\"}", &mut out).unwrap();
        assert_eq!(out.len(), 1);
    }
}
