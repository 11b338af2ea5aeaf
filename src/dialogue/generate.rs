//! The seam under the dialogue manager: a trait over text generation.
//!
//! In service it is the engine ([`EngineGenerator`]). In unit tests it is a
//! [`Scripted`] generator that replies from a list, checks each scripted
//! reply against the grammar the request carried (so a test cannot script
//! a command the model could never produce), and keeps every prompt for
//! assertions. Nothing here loads a model.

use crate::engine::sampler::SamplingParams;
use crate::engine::{Engine, Event, Prompt, Request};
use crate::template::Message;
use crate::adapter::BoxFuture;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// One generation.
#[derive(Debug, Clone)]
pub struct GenRequest {
    /// KV reuse key (requests with the same key share a cache).
    pub session: Option<String>,
    pub messages: Vec<Message>,
    /// A Lark grammar the reply must match.
    pub grammar: Option<String>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub lang: String,
}

/// What a generation cost and produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Generated {
    pub text: String,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

pub trait Generator: Send + Sync {
    /// Generates a reply; text pieces go to `stream` as they come.
    fn generate<'a>(&'a self, req: GenRequest, stream: Option<mpsc::Sender<String>>) -> BoxFuture<'a, Result<Generated, String>>;
}

/// Generation on the in-process engine.
pub struct EngineGenerator(pub Arc<Engine>);

impl Generator for EngineGenerator {
    fn generate<'a>(&'a self, req: GenRequest, stream: Option<mpsc::Sender<String>>) -> BoxFuture<'a, Result<Generated, String>> {
        Box::pin(async move {
            let r = Request {
                session: req.session,
                prompt: Prompt::Chat { messages: req.messages, tools: None, lang: req.lang },
                max_tokens: req.max_tokens,
                sampling: req.sampling,
                stop: Vec::new(),
                constrain_tools: false,
                grammar_tools: None,
                require_call: false,
                share_prefix: true,
                grammar: req.grammar.map(Arc::from),
                compiled: Default::default(),
            };
            let mut rx = self.0.submit(r).map_err(|e| e.to_string())?;
            let mut out = Generated::default();
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Delta(t) => {
                        out.text.push_str(&t);
                        if let Some(s) = &stream {
                            let _ = s.send(t).await;
                        }
                    }
                    Event::Done(u) => {
                        out.prompt_tokens = u.prompt_tokens;
                        out.cached_tokens = u.cached_tokens;
                        out.completion_tokens = u.completion_tokens;
                        out.prefill_ms = u.prefill_ms;
                        out.decode_ms = u.decode_ms;
                    }
                    Event::Error(e) => return Err(format!("the language model failed: {e}")),
                    Event::ToolCall { .. } | Event::ToolCallMalformed { .. } => {}
                }
            }
            Ok(out)
        })
    }
}

/// Replies from a script, in order; for tests.
#[derive(Default)]
pub struct Scripted {
    replies: Mutex<VecDeque<String>>,
    seen: Mutex<Vec<GenRequest>>,
}

impl Scripted {
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(replies: I) -> Arc<Self> {
        Arc::new(Self { replies: Mutex::new(replies.into_iter().map(Into::into).collect()), seen: Mutex::default() })
    }

    /// Adds replies at the end of the script.
    pub fn push<S: Into<String>>(&self, reply: S) {
        self.replies.lock().unwrap_or_else(|p| p.into_inner()).push_back(reply.into());
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<GenRequest> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replies not used yet.
    pub fn left(&self) -> usize {
        self.replies.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Whether `text` is a complete reply under a Lark grammar (bytes as tokens).
pub fn matches_grammar(lark: &str, text: &str) -> Result<(), String> {
    match crate::tools::grammar::run_bytes(lark, text)? {
        Some(true) => Ok(()),
        Some(false) => Err(format!("{text:?} is unfinished under the grammar")),
        None => Err(format!("{text:?} is refused by the grammar")),
    }
}

impl Generator for Scripted {
    fn generate<'a>(&'a self, req: GenRequest, stream: Option<mpsc::Sender<String>>) -> BoxFuture<'a, Result<Generated, String>> {
        Box::pin(async move {
            let grammar = req.grammar.clone();
            self.seen.lock().unwrap_or_else(|p| p.into_inner()).push(req);
            let text = self
                .replies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front()
                .ok_or_else(|| "the script has no reply left".to_string())?;
            if let Some(g) = grammar {
                matches_grammar(&g, &text).map_err(|e| format!("scripted reply outside the grammar: {e}\n{g}"))?;
            }
            if let Some(s) = &stream {
                let _ = s.send(text.clone()).await;
            }
            Ok(Generated { completion_tokens: text.split_whitespace().count(), text, ..Default::default() })
        })
    }
}
