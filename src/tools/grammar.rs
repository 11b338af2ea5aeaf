//! Grammar-constrained decoding with llguidance.
//!
//! With constraints on, a reply is either plain text, or one or more tool
//! calls whose JSON validates against the tools' schemas (only calls when
//! the request requires one: `require_call`). Calls may be
//! written in any of the three shapes the model likes (`<tool_call>` tags, a
//! fenced JSON code block, or bare JSON), so the constraint steers only what must be
//! steered. Plain text may not begin with `<`, `{`, `[` or a backquote, so a
//! call cannot slip out unvalidated as "text".
//!
//! The token trie is built from our own tokenizer's token bytes (control
//! tokens are marked special so text can never spell them), which avoids a
//! second, incompatible `tokenizers` version in the tree.

use super::ToolSet;
use crate::tokenizer::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::Arc;
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    #[error("building the constraint failed: {0}")]
    Build(String),
    #[error("computing the constraint mask failed: {0}")]
    Mask(String),
    #[error("the constraint rejected token {0}: {1}")]
    Rejected(u32, String),
}

struct Env {
    trie: TokTrie,
    tok: Arc<Tokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Bytes to tokens, as the parser asks when the grammar forces bytes.
    /// Forced bytes may end or start inside a character (the rest of "블"
    /// after its first two bytes): those are tokenized byte by byte, not
    /// turned into U+FFFD, whose token the grammar would then let through.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |t| self.tok.encode(t, false).unwrap_or_default())
    }
}

/// Shared, per-model state for building constraints (the trie and parser
/// factory are built once; each request gets its own [`ToolConstraint`]).
pub struct ConstraintFactory {
    factory: ParserFactory,
    eog: Vec<u32>,
    n_vocab: usize,
}

impl ConstraintFactory {
    /// `n_vocab` is the number of logits the model produces (it may exceed
    /// the tokenizer's vocabulary; the extra ids are never allowed).
    pub fn new(tok: Arc<Tokenizer>, n_vocab: usize) -> Result<Self, GrammarError> {
        let n_vocab = n_vocab.max(tok.vocab_size());
        let mut words: Vec<Vec<u8>> = Vec::with_capacity(n_vocab);
        for id in 0..n_vocab as u32 {
            let w = if (id as usize) < tok.vocab_size() {
                if tok.is_control(id) || tok.is_unused(id) {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(tok.token_bytes(id));
                    w
                } else {
                    tok.token_bytes(id).to_vec()
                }
            } else {
                let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                w.extend_from_slice(format!("<|pad_{id}|>").as_bytes());
                w
            };
            words.push(w);
        }
        let eos = tok
            .eog_ids
            .first()
            .copied()
            .ok_or_else(|| GrammarError::Build("the model has no end-of-turn token".into()))?;
        let info = TokRxInfo::new(n_vocab as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Env {
            trie,
            tok: tok.clone(),
        });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Build(e.to_string()))?;
        factory.set_stderr_log_level(0);
        Ok(Self {
            factory,
            eog: tok.eog_ids.clone(),
            n_vocab,
        })
    }

    /// A constraint for one reply with these tools; with `require_call` the
    /// reply must be tool calls (no plain text).
    pub fn for_tools(&self, tools: &ToolSet, require_call: bool) -> Result<ToolConstraint, GrammarError> {
        self.for_lark(&lark_for_tools(tools, require_call))
    }

    /// A constraint for one reply that must match a Lark grammar.
    pub fn for_lark(&self, lark: &str) -> Result<ToolConstraint, GrammarError> {
        let grammar = TopLevelGrammar::from_lark(lark.to_owned());
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| GrammarError::Build(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Build(e));
        }
        Ok(ToolConstraint {
            matcher,
            eog: self.eog.clone(),
            n_vocab: self.n_vocab,
        })
    }
}

/// The JSON schema of one call to any of the tools: `{"name", "arguments"}`.
pub fn call_schema(tools: &ToolSet) -> Value {
    let options: Vec<Value> = tools
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {
                    "name": {"const": t.def.name},
                    "arguments": t.def.parameters,
                },
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    if options.len() == 1 {
        options.into_iter().next().expect("one option")
    } else {
        json!({ "anyOf": options })
    }
}

/// The most calls one reply may make. A small model that starts repeating
/// a call keeps writing it until `max_tokens` runs out (seen with the default
/// model in the food browser test: six searches, the last cut off), which
/// costs a whole reply's decode time and ends in a malformed call. Three
/// still lets one reply look up several items ("milk and apples").
pub const MAX_CALLS_PER_REPLY: usize = 3;

/// `item`, then up to `MAX_CALLS_PER_REPLY - 1` more separated by
/// whitespace, as Lark.
fn up_to_max(item: &str) -> String {
    let mut s = item.to_owned();
    for _ in 1..MAX_CALLS_PER_REPLY {
        s.push_str(&format!(" (WS {item})?"));
    }
    s
}

/// Text that holds no `<tool_call>` tag and no code fence anywhere.
const NO_CALL_INSIDE: &str = "~/(?s:.*)(<tool_call>|```)(?s:.*)/";

/// Lark grammar: plain text, or one to [`MAX_CALLS_PER_REPLY`] calls in one
/// of the accepted shapes (one shape per reply, so the streaming parser
/// always sees what it expects).
/// Text may not begin like a call, and may not contain `<tool_call>` or a
/// code fence anywhere, so no call can pass unvalidated as "text". With
/// `require_call` there is no text alternative: the reply is calls only.
pub fn lark_for_tools(tools: &ToolSet, require_call: bool) -> String {
    if tools.is_empty() && !require_call {
        // Nothing may be called this round (every tool of the conversation's
        // mini-program has run as often as it may): the reply is prose. No
        // braces at all, or a small model writes calls as "text" until its
        // token budget runs out.
        return format!("start: PROSE\nPROSE: /[^<{{}}\\[`\\s][^{{}}]*/ & {NO_CALL_INSIDE}\n");
    }
    let schema = call_schema(tools);
    // Plain text may not start like a call either.
    let (text_alt, text_rule) = if require_call {
        ("", String::new())
    } else {
        ("TEXT | ", format!("TEXT: /[^<{{\\[`\\s](?s:.*)/ & {NO_CALL_INSIDE}\n"))
    };
    format!(
        r#"start: {text_alt}{tagged} WS? | {fenced} WS? | {body} WS?
tagged: "<tool_call>" WS? body WS? "</tool_call>"
fenced: "```json\n" WS? body WS? "```"
body: %json {schema}
{text_rule}WS: /[ \t\r\n]+/
"#,
        tagged = up_to_max("tagged"),
        fenced = up_to_max("fenced"),
        body = up_to_max("body"),
    )
}

/// Runs a Lark grammar over `text` one byte per token, without a model:
/// `Err` when the grammar does not build, `Ok(None)` when a byte is refused,
/// else whether the whole text is a complete reply. Tests, and the scripted
/// generator's check of its replies, use it.
pub fn run_bytes(lark: &str, text: &str) -> Result<Option<bool>, String> {
    let env = toktrie::ApproximateTokEnv::single_byte_env();
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    factory.set_stderr_log_level(0);
    let parser = factory.create_parser(TopLevelGrammar::from_lark(lark.to_owned())).map_err(|e| e.to_string())?;
    let mut m = Matcher::new(Ok(parser));
    if let Some(e) = m.get_error() {
        return Err(e);
    }
    for b in text.bytes() {
        if m.consume_token(b as u32).is_err() {
            return Ok(None);
        }
    }
    Ok(Some(m.is_accepting().unwrap_or(false)))
}

/// Per-reply constraint state: masks logits and follows sampled tokens.
pub struct ToolConstraint {
    matcher: Matcher,
    eog: Vec<u32>,
    n_vocab: usize,
}

impl ToolConstraint {
    /// Sets every logit the grammar forbids to -inf. End-of-turn tokens are
    /// allowed exactly when the grammar is in an accepting state.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), GrammarError> {
        let vob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| GrammarError::Mask(e.to_string()))?;
        let eos_ok = self.eog.iter().any(|&e| vob.is_allowed(e));
        let n = logits.len().min(self.n_vocab);
        for (i, l) in logits.iter_mut().enumerate().take(n) {
            let id = i as u32;
            let allowed = if self.eog.contains(&id) {
                eos_ok
            } else {
                vob.is_allowed(id)
            };
            if !allowed {
                *l = f32::NEG_INFINITY;
            }
        }
        for l in logits.iter_mut().skip(n) {
            *l = f32::NEG_INFINITY;
        }
        Ok(())
    }

    pub fn consume(&mut self, token: u32) -> Result<(), GrammarError> {
        if self.eog.contains(&token) {
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| GrammarError::Rejected(token, e.to_string()))
    }

    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::{Localized, Tool, ToolDef};

    fn weather() -> ToolSet {
        let def = ToolDef {
            name: "get_weather".into(),
            description: Localized { en: "Weather for a city".into(), zh: None, ko: None },
            parameters: json!({
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            }),
            confirm: false,
            endpoint: None,
            card: None,
            quote: None,
            result: None,
            role: None,
            order_id: None,
            final_statuses: Vec::new(),
        };
        ToolSet::from_tools(vec![Tool::new("t", def).unwrap()])
    }

    fn run(lark: String, text: &str) -> Option<bool> {
        run_bytes(&lark, text).unwrap()
    }

    const CALL: &str = r#"<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris"}}
</tool_call>"#;

    #[test]
    fn require_call_rejects_text_but_accepts_a_call() {
        let tools = weather();
        let free = || lark_for_tools(&tools, false);
        let required = || lark_for_tools(&tools, true);
        assert_eq!(run(free(), "Hello there."), Some(true));
        assert_eq!(run(free(), CALL), Some(true));
        // Required: the very first byte of plain text is refused.
        assert_eq!(run(required(), "H"), None);
        assert_eq!(run(required(), "Hello there."), None);
        assert_eq!(run(required(), CALL), Some(true));
        assert_eq!(run(required(), r#"{"name": "get_weather", "arguments": {"city": "Rome"}}"#), Some(true));
        // Calls must still fit the schema, and an unfinished one is not a reply.
        assert_eq!(run(required(), r#"{"name": "get_weather", "arguments": {}}"#), None);
        assert_eq!(run(required(), "<tool_call>\n{\"name\": \"get_weather\""), Some(false));
        assert!(!required().contains("TEXT"));
    }

    #[test]
    fn no_tools_means_text_only() {
        let none = || lark_for_tools(&ToolSet::default(), false);
        assert_eq!(run(none(), "Sorry, I found nothing."), Some(true));
        assert_eq!(run(none(), CALL), None);
        assert_eq!(run(none(), r#"{"name": "get_weather""#), None);
        assert_eq!(run(none(), "```json\n"), None);
        assert_eq!(run(none(), "Here it is: {\"name\""), None);
    }

    #[test]
    fn a_reply_holds_at_most_max_calls() {
        let lark = || lark_for_tools(&weather(), false);
        let calls = |n: usize| vec![CALL; n].join("\n");
        for n in 1..=MAX_CALLS_PER_REPLY {
            assert_eq!(run(lark(), &calls(n)), Some(true), "{n} calls");
        }
        // One more is refused where it starts: the reply has to end instead.
        assert_eq!(run(lark(), &format!("{}\n<", calls(MAX_CALLS_PER_REPLY))), None);
        // The same for bare JSON bodies.
        let body = r#"{"name": "get_weather", "arguments": {"city": "Rome"}}"#;
        assert_eq!(run(lark(), &vec![body; MAX_CALLS_PER_REPLY].join(" ")), Some(true));
        assert_eq!(run(lark(), &format!("{} {{", vec![body; MAX_CALLS_PER_REPLY].join(" "))), None);
    }
}
