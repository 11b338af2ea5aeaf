//! Grammar-constrained decoding with llguidance.
//!
//! With constraints on, a reply is either plain text, or one or more tool
//! calls whose JSON validates against the tools' schemas. Calls may be
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

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.tok
            .encode(&String::from_utf8_lossy(s), false)
            .unwrap_or_default()
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

    /// A constraint for one reply with these tools.
    pub fn for_tools(&self, tools: &ToolSet) -> Result<ToolConstraint, GrammarError> {
        let grammar = TopLevelGrammar::from_lark(lark_for_tools(tools));
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

/// Lark grammar: plain text, or calls in one of the accepted shapes (one
/// shape per reply, so the streaming parser always sees what it expects).
/// Text may not begin like a call, and may not contain `<tool_call>` or a
/// code fence anywhere, so no call can pass unvalidated as "text".
pub fn lark_for_tools(tools: &ToolSet) -> String {
    let schema = call_schema(tools);
    format!(
        r#"start: TEXT | tagged (WS tagged)* WS? | fenced (WS fenced)* WS? | body (WS body)* WS?
tagged: "<tool_call>" WS? body WS? "</tool_call>"
fenced: "```json\n" WS? body WS? "```"
body: %json {schema}
TEXT: /[^<{{\[`\s](?s:.*)/ & ~/(?s:.*)(<tool_call>|```)(?s:.*)/
WS: /[ \t\r\n]+/
"#
    )
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
