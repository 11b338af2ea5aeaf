//! Tolerant parsing of tool calls out of model text.
//!
//! Small models write tool calls in several shapes; all of these are accepted:
//! - the Qwen/Hermes form `<tool_call>{"name": …, "arguments": …}</tool_call>`,
//!   several in one reply;
//! - a fenced JSON code block (`` ```json ``) holding a call (or an array of calls);
//! - a bare JSON object (or array) with `name` and `arguments`, as the whole
//!   reply;
//! - `arguments` as an object or as a JSON string, or under `parameters`;
//!   `{"function": {...}}` wrappers; no arguments at all for zero-argument tools.
//!
//! [`CallStream`] does this incrementally over streamed text: plain text is
//! released as soon as it cannot be the start of a call, a `<tool_call>` tag
//! split across chunks is held back until it is complete, and malformed or
//! truncated calls come out as [`StreamItem::Malformed`], never a panic.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    Text(String),
    Call(ToolCall),
    /// Something that was meant as a tool call but is not one; the string
    /// says why, and `raw` is the offending text.
    Malformed { reason: String, raw: String },
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const FENCE: &str = "```";

/// Interprets one JSON value as one or more tool calls.
pub fn calls_from_json(v: &Value) -> Result<Vec<ToolCall>, String> {
    match v {
        Value::Array(items) if !items.is_empty() => items.iter().map(call_from_object).collect(),
        Value::Object(_) => Ok(vec![call_from_object(v)?]),
        _ => Err("a tool call must be a JSON object with `name` and `arguments`".into()),
    }
}

fn call_from_object(v: &Value) -> Result<ToolCall, String> {
    let obj = v
        .as_object()
        .ok_or("a tool call must be a JSON object with `name` and `arguments`")?;
    // OpenAI-style wrapper: {"type": "function", "function": {...}}
    if let Some(inner @ Value::Object(_)) = obj.get("function") {
        return call_from_object(inner);
    }
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .ok_or("the tool call has no `name` string")?
        .trim()
        .to_owned();
    let args = obj.get("arguments").or_else(|| obj.get("parameters"));
    let arguments = match args {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(Value::String(s)) if s.trim().is_empty() => Map::new(),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(format!("`arguments` of `{name}` is a string that is not a JSON object")),
            Err(e) => return Err(format!("`arguments` of `{name}` is not valid JSON: {e}")),
        },
        Some(_) => return Err(format!("`arguments` of `{name}` must be an object")),
    };
    Ok(ToolCall { name, arguments })
}

/// True when `v` looks like it was meant as a tool call (not just any JSON):
/// a `function` wrapper, or a `name` string with `arguments`/`parameters` and
/// no other keys. (`{"name": "Alice"}` is data, not a call.)
fn looks_like_call(v: &Value) -> bool {
    let one = |o: &Value| {
        o.as_object().is_some_and(|m| {
            m.get("function").is_some_and(Value::is_object)
                || (m.get("name").is_some_and(Value::is_string)
                    && (m.contains_key("arguments") || m.contains_key("parameters"))
                    && m.keys().all(|k| matches!(k.as_str(), "name" | "arguments" | "parameters" | "id" | "type")))
        })
    };
    match v {
        Value::Array(a) => !a.is_empty() && a.iter().all(one),
        other => one(other),
    }
}

/// Parses a complete reply (what [`CallStream`] does, in one go).
pub fn parse_reply(text: &str) -> Vec<StreamItem> {
    let mut s = CallStream::new();
    let mut out = s.push(text);
    out.extend(s.finish());
    out
}

/// Incremental tool-call extraction over streamed text.
#[derive(Debug, Default)]
pub struct CallStream {
    buf: String,
    /// Nothing but whitespace has been released yet.
    at_start: bool,
    mode: Mode,
    /// Leading whitespace held while we learn whether the reply is bare JSON.
    lead: String,
}

#[derive(Debug, Default, PartialEq)]
enum Mode {
    #[default]
    Text,
    /// Inside `<tool_call>` … waiting for `</tool_call>`.
    Tagged,
    /// Inside a code fence, waiting for the closing fence.
    Fenced,
    /// The reply began with `{` or `[`: buffered until the end.
    Bare,
}

impl CallStream {
    pub fn new() -> Self {
        Self {
            at_start: true,
            ..Default::default()
        }
    }

    pub fn push(&mut self, chunk: &str) -> Vec<StreamItem> {
        self.buf.push_str(chunk);
        let mut out = Vec::new();
        loop {
            match self.mode {
                Mode::Bare => return out,
                Mode::Tagged => {
                    // The body ends at `</tool_call>`, or at a new `<tool_call>`
                    // when the model forgot to close the previous one.
                    let close = self.buf.find(CLOSE).map(|i| (i, CLOSE.len()));
                    let reopen = self.buf.find(OPEN).map(|i| (i, 0));
                    let end = match (close, reopen) {
                        (Some(c), Some(r)) => Some(if r.0 < c.0 { r } else { c }),
                        (c, r) => c.or(r),
                    };
                    match end {
                        Some((end, skip)) => {
                            let body = self.buf[..end].to_owned();
                            self.buf.drain(..end + skip);
                            out.extend(parse_call_body(&body, true));
                            self.mode = Mode::Text;
                        }
                        None => return out,
                    }
                }
                Mode::Fenced => match self.buf.find(FENCE) {
                    Some(end) => {
                        let body = self.buf[..end].to_owned();
                        self.buf.drain(..end + FENCE.len());
                        self.mode = Mode::Text;
                        out.extend(fenced_block(&body));
                    }
                    None => return out,
                },
                Mode::Text => {
                    if self.at_start {
                        let trimmed = self.buf.trim_start();
                        if trimmed.is_empty() {
                            return out;
                        }
                        if trimmed.starts_with('{') || trimmed.starts_with('[') {
                            let ws = self.buf.len() - trimmed.len();
                            self.lead = self.buf[..ws].to_owned();
                            self.buf.drain(..ws);
                            self.mode = Mode::Bare;
                            return out;
                        }
                    }
                    let open = self.buf.find(OPEN);
                    let fence = self.buf.find(FENCE);
                    let next = match (open, fence) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    match next {
                        Some(i) => {
                            self.emit_text(i, &mut out);
                            if self.buf.starts_with(OPEN) {
                                self.buf.drain(..OPEN.len());
                                self.mode = Mode::Tagged;
                            } else {
                                self.buf.drain(..FENCE.len());
                                self.mode = Mode::Fenced;
                            }
                            self.at_start = false;
                        }
                        None => {
                            // Release everything that cannot be the start of a tag or fence.
                            let keep = partial_suffix(&self.buf);
                            let n = self.buf.len() - keep;
                            self.emit_text(n, &mut out);
                            return out;
                        }
                    }
                }
            }
        }
    }

    fn emit_text(&mut self, n: usize, out: &mut Vec<StreamItem>) {
        if n == 0 {
            return;
        }
        let text: String = self.buf.drain(..n).collect();
        if !text.trim().is_empty() {
            self.at_start = false;
        }
        push_text(out, text);
    }

    /// Call when generation has ended: flushes what is held back.
    pub fn finish(&mut self) -> Vec<StreamItem> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        match std::mem::take(&mut self.mode) {
            Mode::Text => push_text(&mut out, rest),
            Mode::Tagged => {
                // A complete body whose closing tag never came is still a call.
                let items = parse_call_body(&rest, true);
                if items.iter().all(|i| matches!(i, StreamItem::Call(_))) {
                    out.extend(items);
                } else {
                    out.push(StreamItem::Malformed {
                        reason: "the reply ended inside <tool_call> (truncated tool call)".into(),
                        raw: format!("{OPEN}{rest}"),
                    });
                }
            }
            Mode::Fenced => {
                // An unterminated fence: a call if it parses, text otherwise.
                let items = fenced_block(&rest);
                if items.iter().any(|i| matches!(i, StreamItem::Call(_))) {
                    out.extend(items);
                } else if looks_like_truncated_call(&rest) {
                    out.push(StreamItem::Malformed {
                        reason: "the reply ended inside a JSON tool call (truncated)".into(),
                        raw: rest,
                    });
                } else {
                    push_text(&mut out, format!("{FENCE}{rest}"));
                }
            }
            Mode::Bare => {
                let lead = std::mem::take(&mut self.lead);
                out.extend(bare_json(&lead, &rest));
            }
        }
        self.at_start = true;
        out
    }
}

fn push_text(out: &mut Vec<StreamItem>, text: String) {
    if text.is_empty() {
        return;
    }
    if let Some(StreamItem::Text(prev)) = out.last_mut() {
        prev.push_str(&text);
    } else {
        out.push(StreamItem::Text(text));
    }
}

/// Length of the longest suffix of `s` that is a proper prefix of a tag or fence.
fn partial_suffix(s: &str) -> usize {
    let mut best = 0;
    for pat in [OPEN, FENCE] {
        for n in (1..pat.len()).rev() {
            if n <= s.len() && s.is_char_boundary(s.len() - n) && s.ends_with(&pat[..n]) {
                best = best.max(n);
                break;
            }
        }
    }
    best
}

fn parse_call_body(body: &str, tagged: bool) -> Vec<StreamItem> {
    let trimmed = body.trim();
    // Some models wrap the JSON in a fence inside the tags.
    let inner = strip_fence(trimmed).unwrap_or(trimmed);
    match serde_json::from_str::<Value>(inner) {
        Ok(v) => match calls_from_json(&v) {
            Ok(calls) => calls.into_iter().map(StreamItem::Call).collect(),
            Err(reason) => vec![StreamItem::Malformed {
                reason,
                raw: body.to_owned(),
            }],
        },
        Err(e) => vec![StreamItem::Malformed {
            reason: format!(
                "{} is not valid JSON: {e}",
                if tagged { "the <tool_call> body" } else { "the tool call" }
            ),
            raw: body.to_owned(),
        }],
    }
}

fn strip_fence(s: &str) -> Option<&str> {
    let s = s.strip_prefix(FENCE)?;
    let s = s.strip_prefix("json").unwrap_or(s);
    Some(s.strip_suffix(FENCE).unwrap_or(s).trim())
}

/// A fenced block: a call if its JSON is call-shaped, otherwise the text back.
fn fenced_block(body: &str) -> Vec<StreamItem> {
    // The language tag runs to the first newline, or, when the model put the
    // JSON on the same line (```json {...}), to the first `{` or `[`.
    let tag_end = body
        .find(|c: char| c == '\n' || c == '{' || c == '[')
        .unwrap_or(body.len());
    let (lang, code) = (body[..tag_end].trim(), &body[tag_end..]);
    let json_like = matches!(lang, "" | "json" | "JSON" | "tool_call");
    if json_like {
        if let Ok(v) = serde_json::from_str::<Value>(code.trim()) {
            if looks_like_call(&v) {
                return match calls_from_json(&v) {
                    Ok(calls) => calls.into_iter().map(StreamItem::Call).collect(),
                    Err(reason) => vec![StreamItem::Malformed {
                        reason,
                        raw: body.to_owned(),
                    }],
                };
            }
        }
    }
    vec![StreamItem::Text(format!("{FENCE}{body}{FENCE}"))]
}

fn looks_like_truncated_call(s: &str) -> bool {
    let t = s.trim_start().trim_start_matches("json").trim_start();
    t.starts_with('{') && t.contains("\"name\"")
}

/// The whole reply was JSON-ish: calls, a malformed call, or just text.
fn bare_json(lead: &str, body: &str) -> Vec<StreamItem> {
    let trimmed = body.trim();
    let mut de = serde_json::Deserializer::from_str(trimmed).into_iter::<Value>();
    match de.next() {
        Some(Ok(v)) if looks_like_call(&v) => {
            let consumed = de.byte_offset();
            let mut out: Vec<StreamItem> = match calls_from_json(&v) {
                Ok(calls) => calls.into_iter().map(StreamItem::Call).collect(),
                Err(reason) => vec![StreamItem::Malformed {
                    reason,
                    raw: trimmed[..consumed].to_owned(),
                }],
            };
            // More text (or more calls) may follow the first object.
            let rest = &trimmed[consumed..];
            if !rest.trim().is_empty() {
                out.extend(parse_reply(rest));
            }
            out
        }
        Some(Err(e)) if e.is_eof() && trimmed.contains("\"name\"") => vec![StreamItem::Malformed {
            reason: "the reply ended inside a JSON tool call (truncated)".into(),
            raw: trimmed.to_owned(),
        }],
        _ => vec![StreamItem::Text(format!("{lead}{body}"))],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn calls(items: &[StreamItem]) -> Vec<&ToolCall> {
        items
            .iter()
            .filter_map(|i| match i {
                StreamItem::Call(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    fn text(items: &[StreamItem]) -> String {
        items
            .iter()
            .filter_map(|i| match i {
                StreamItem::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    fn malformed(items: &[StreamItem]) -> usize {
        items
            .iter()
            .filter(|i| matches!(i, StreamItem::Malformed { .. }))
            .count()
    }

    #[test]
    fn hermes_tagged_call() {
        let r = parse_reply("<tool_call>\n{\"name\": \"ride_quote\", \"arguments\": {\"dropoff\": \"Pudong\"}}\n</tool_call>");
        let c = calls(&r);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].name, "ride_quote");
        assert_eq!(c[0].arguments["dropoff"], json!("Pudong"));
        assert_eq!(text(&r).trim(), "");
    }

    #[test]
    fn bare_json_and_fenced_json() {
        let r = parse_reply("{\"name\": \"a\", \"arguments\": {\"x\": 1}}");
        assert_eq!(calls(&r)[0].name, "a");
        let r = parse_reply("Sure!\n```json\n{\"name\": \"b\", \"arguments\": {}}\n```\n");
        assert_eq!(calls(&r)[0].name, "b");
        assert_eq!(text(&r).trim(), "Sure!");
    }

    #[test]
    fn arguments_as_string_parameters_and_wrappers() {
        let r = parse_reply(r#"<tool_call>{"name":"a","arguments":"{\"k\": \"v\"}"}</tool_call>"#);
        assert_eq!(calls(&r)[0].arguments["k"], json!("v"));
        let r = parse_reply(r#"<tool_call>{"name":"a","parameters":{"k":2}}</tool_call>"#);
        assert_eq!(calls(&r)[0].arguments["k"], json!(2));
        let r = parse_reply(r#"{"type":"function","function":{"name":"c","arguments":{}}}"#);
        assert_eq!(calls(&r)[0].name, "c");
    }

    #[test]
    fn zero_argument_call() {
        let r = parse_reply(r#"<tool_call>{"name": "where_am_i"}</tool_call>"#);
        assert_eq!(calls(&r)[0].name, "where_am_i");
        assert!(calls(&r)[0].arguments.is_empty());
        let r = parse_reply(r#"<tool_call>{"name": "where_am_i", "arguments": ""}</tool_call>"#);
        assert!(calls(&r)[0].arguments.is_empty());
    }

    #[test]
    fn several_calls_in_one_reply() {
        let r = parse_reply(
            "<tool_call>{\"name\":\"a\",\"arguments\":{}}</tool_call>\n<tool_call>{\"name\":\"b\",\"arguments\":{}}</tool_call>",
        );
        let names: Vec<_> = calls(&r).iter().map(|c| c.name.clone()).collect();
        assert_eq!(names, ["a", "b"]);
        let r = parse_reply(r#"[{"name":"a","arguments":{}},{"name":"b","arguments":{"n":1}}]"#);
        assert_eq!(calls(&r).len(), 2);
    }

    #[test]
    fn tags_split_across_chunks_at_every_position() {
        let full = "Let me check.<tool_call>{\"name\": \"menu\", \"arguments\": {\"shop\": \"川味\"}}</tool_call> done";
        let chars: Vec<char> = full.chars().collect();
        for cut in 1..chars.len() {
            let a: String = chars[..cut].iter().collect();
            let b: String = chars[cut..].iter().collect();
            let mut s = CallStream::new();
            let mut items = s.push(&a);
            // Nothing after the tag start may leak out as text.
            assert!(!text(&items).contains('<'), "cut {cut}: {items:?}");
            items.extend(s.push(&b));
            items.extend(s.finish());
            let c = calls(&items);
            assert_eq!(c.len(), 1, "cut {cut}: {items:?}");
            assert_eq!(c[0].arguments["shop"], json!("川味"));
            assert_eq!(text(&items), "Let me check. done", "cut {cut}");
        }
    }

    #[test]
    fn token_by_token_streaming() {
        let full = "```json\n{\"name\": \"x\", \"arguments\": {\"a\": [1, 2]}}\n```";
        let mut s = CallStream::new();
        let mut items = Vec::new();
        for ch in full.chars() {
            items.extend(s.push(&ch.to_string()));
        }
        items.extend(s.finish());
        assert_eq!(calls(&items).len(), 1);
        assert_eq!(malformed(&items), 0);
    }

    #[test]
    fn malformed_and_truncated_calls_are_errors_not_panics() {
        let r = parse_reply("<tool_call>{\"name\": \"a\", \"arguments\": {\"x\": }</tool_call>");
        assert_eq!(malformed(&r), 1);
        let r = parse_reply("<tool_call>{\"name\": \"a\", \"argu");
        assert_eq!(malformed(&r), 1);
        let r = parse_reply("{\"name\": \"a\", \"arguments\": {\"x\"");
        assert_eq!(malformed(&r), 1);
        let r = parse_reply("<tool_call>{\"arguments\": {}}</tool_call>");
        assert_eq!(malformed(&r), 1);
        let r = parse_reply("<tool_call>[1,2]</tool_call>");
        assert_eq!(malformed(&r), 1);
        let r = parse_reply("<tool_call>{\"name\":\"a\",\"arguments\":\"not json\"}</tool_call>");
        assert_eq!(malformed(&r), 1);
        // Every prefix of a call parses without panicking.
        let full = "<tool_call>{\"name\": \"a\", \"arguments\": {\"s\": \"한국\"}}</tool_call>";
        for (i, _) in full.char_indices() {
            let _ = parse_reply(&full[..i]);
        }
    }

    #[test]
    fn fence_with_json_on_the_tag_line_and_unclosed_tags() {
        let r = parse_reply("```json {\"name\": \"a\", \"arguments\": {}}```");
        assert_eq!(calls(&r).len(), 1, "{r:?}");
        assert_eq!(text(&r), "");
        // No closing tag before the end: still a call when the body is complete.
        let r = parse_reply("<tool_call>{\"name\": \"a\", \"arguments\": {}}");
        assert_eq!(calls(&r).len(), 1, "{r:?}");
        // A second opening tag before the first is closed.
        let r = parse_reply("<tool_call>{\"name\":\"a\",\"arguments\":{}}<tool_call>{\"name\":\"b\",\"arguments\":{}}</tool_call>");
        assert_eq!(calls(&r).len(), 2, "{r:?}");
    }

    #[test]
    fn json_with_a_name_field_is_not_a_call() {
        let r = parse_reply("{\"name\": \"Alice\"}");
        assert!(calls(&r).is_empty());
        assert_eq!(text(&r), "{\"name\": \"Alice\"}");
    }

    #[test]
    fn plain_text_and_non_call_json_stay_text() {
        let r = parse_reply("The capital of France is Paris.");
        assert_eq!(text(&r), "The capital of France is Paris.");
        let r = parse_reply("{\"city\": \"Paris\", \"population\": 2}");
        assert!(calls(&r).is_empty());
        assert!(text(&r).contains("Paris"));
        let r = parse_reply("Use `ls` and ```rust\nfn main() {}\n``` ok");
        assert!(calls(&r).is_empty());
        assert!(text(&r).contains("fn main()"));
        let r = parse_reply("a < b and c > d");
        assert_eq!(text(&r), "a < b and c > d");
    }
}
