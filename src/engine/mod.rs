//! The inference engine: one thread that owns the model and every session's
//! KV cache, fed through a bounded queue.
//!
//! Callers (the chat REPL, later the server) send a [`Request`] carrying its
//! own reply channel and get [`Event`]s back: text deltas, tool calls, and a
//! final `Done` with usage and timings. Errors travel as events too. Forward
//! passes never run on async worker threads: the engine thread is a plain OS
//! thread, and `submit` only enqueues. A full queue answers
//! [`EngineError::Busy`] at once instead of waiting.
//!
//! Cancellation: when the receiver of a request's events is dropped, the
//! engine notices before computing the next token and stops.

pub mod detok;
pub mod kv_pool;
pub mod sampler;

use crate::catalog::ResolvedModel;
use crate::gguf::{GgufError, GgufFile};
use crate::model::{LoadOptions, ModelError, Transformer};
use crate::prompt::{PromptBuilder, PromptError, Prompts};
use crate::template::{ChatTemplate, Message, TemplateError};
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::tools::grammar::{ConstraintFactory, GrammarError, ToolConstraint};
use crate::tools::{CallStream, StreamItem, ToolCall, ToolSet};
use detok::TextStream;
use kv_pool::{common_prefix, KvPool};
use sampler::{Sampler, SamplingParams};
use serde::Serialize;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Grammar(#[from] GrammarError),
    #[error("the engine is busy ({0} requests queued); try again shortly")]
    Busy(usize),
    #[error("the engine has stopped")]
    Stopped,
    #[error(
        "the prompt has {prompt} tokens but the model's context is {context}; \
         shorten the conversation (Errand refuses rather than silently dropping text)"
    )]
    PromptTooLong { prompt: usize, context: usize },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("internal error in the engine: {0}")]
    Internal(String),
}

/// Borrow another session's cached prefix only when it saves at least this
/// many tokens of prefill (a copy costs memory bandwidth too).
const SHARED_PREFIX_MIN: usize = crate::model::PREFILL_CHUNK;

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// A conversation rendered with the model's chat template.
    Chat {
        messages: Vec<Message>,
        tools: Option<Arc<ToolSet>>,
        /// Language for tool descriptions (`en`, `zh`, `ko`).
        lang: String,
    },
    /// Raw text, control tokens parsed (benchmarks, tests).
    Text(String),
    /// Pre-tokenized input.
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone)]
pub struct Request {
    /// Requests with the same session id share a KV cache.
    pub session: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Constrain decoding so that tool calls always validate.
    pub constrain_tools: bool,
    /// With constraints on, calls are constrained to these definitions
    /// instead of the prompt's tools: fewer tools, or narrower schemas (ids
    /// limited to the ones tool results returned). The prompt still lists
    /// every tool, so the session's KV cache stays valid.
    pub grammar_tools: Option<Arc<ToolSet>>,
    /// With constraints on, the reply must be one or more tool calls: the
    /// grammar has no plain-text alternative (OpenAI's
    /// `tool_choice: "required"`, or a named function with `grammar_tools`
    /// holding only that function). Ignored without tools or constraints.
    pub require_call: bool,
}

impl Request {
    pub fn chat(messages: Vec<Message>) -> Self {
        Self {
            session: None,
            prompt: Prompt::Chat {
                messages,
                tools: None,
                lang: "en".into(),
            },
            max_tokens: 512,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            constrain_tools: false,
            grammar_tools: None,
            require_call: false,
        }
    }

    pub fn text(text: impl Into<String>) -> Self {
        Self {
            prompt: Prompt::Text(text.into()),
            ..Self::chat(Vec::new())
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its turn.
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// A stop string was produced.
    StopString,
    /// The receiver went away.
    Cancelled,
}

#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the session cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub finish: FinishReason,
    /// Time from the engine picking up the request to the first token.
    pub ttft_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub queue_ms: f64,
}

impl Usage {
    pub fn decode_tok_per_s(&self) -> f64 {
        if self.decode_ms > 0.0 && self.completion_tokens > 1 {
            (self.completion_tokens - 1) as f64 / (self.decode_ms / 1000.0)
        } else {
            0.0
        }
    }
}

#[derive(Debug, Clone)]
pub enum Event {
    /// Newly generated text (never contains tool-call markup).
    Delta(String),
    /// A tool call; `error` says why it does not validate (unknown tool,
    /// arguments that break the schema), `None` when it does.
    ToolCall { call: ToolCall, error: Option<String> },
    /// Text that was meant as a tool call but could not be parsed.
    ToolCallMalformed { reason: String, raw: String },
    Done(Usage),
    Error(String),
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub load: LoadOptions,
    /// Memory for all sessions' KV caches together.
    pub kv_budget_bytes: usize,
    /// Requests waiting beyond the one being served.
    pub queue_depth: usize,
    /// Chat template source overriding the GGUF's.
    pub template_override: Option<String>,
    pub prompts: Prompts,
    /// Events buffered per request before the engine waits for the reader.
    pub event_buffer: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            load: LoadOptions::default(),
            kv_budget_bytes: 1 << 30,
            queue_depth: 16,
            template_override: None,
            prompts: Prompts::builtin(),
            event_buffer: 1024,
        }
    }
}

/// What callers may know about the loaded model.
pub struct ModelInfo {
    pub name: String,
    pub arch: String,
    pub context_length: usize,
    pub n_vocab: usize,
    pub tokenizer: Arc<Tokenizer>,
    pub prompt: Arc<PromptBuilder>,
    pub load_ms: f64,
}

struct Job {
    req: Request,
    out: mpsc::Sender<Event>,
    queued: Instant,
}

/// Cheap-to-clone handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: std_mpsc::SyncSender<Job>,
    pub info: Arc<ModelInfo>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    stats: Arc<Mutex<EngineStats>>,
    event_buffer: usize,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct EngineStats {
    pub requests: u64,
    /// Requests stopped because their receiver was dropped.
    pub cancelled: u64,
    /// Usage of the most recently finished request (also cancelled ones).
    pub last: Option<Usage>,
    pub kv_sessions: usize,
    pub kv_bytes: usize,
    pub kv_evictions: u64,
}

impl Engine {
    /// Loads the model on a new engine thread and returns once it is ready.
    pub fn start(model: &ResolvedModel, opts: EngineOptions) -> Result<Self, EngineError> {
        let (tx, rx) = std_mpsc::sync_channel::<Job>(opts.queue_depth.max(1));
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let model = model.clone();
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let stats2 = stats.clone();
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let queued2 = queued.clone();
        let event_buffer = opts.event_buffer.max(1);
        std::thread::Builder::new()
            .name("errand-engine".into())
            .spawn(move || match Worker::load(&model, &opts) {
                Ok(mut w) => {
                    let _ = ready_tx.send(Ok(w.info.clone()));
                    while let Ok(job) = rx.recv() {
                        queued2.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        w.serve(job, &stats2);
                    }
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| EngineError::Internal(format!("cannot start the engine thread: {e}")))?;
        let info = ready_rx.recv().map_err(|_| EngineError::Stopped)??;
        Ok(Self {
            tx,
            info,
            queued,
            stats,
            event_buffer,
        })
    }

    /// Queues a request; events arrive on the returned receiver. Dropping the
    /// receiver cancels the request.
    pub fn submit(&self, req: Request) -> Result<mpsc::Receiver<Event>, EngineError> {
        req.sampling.validate().map_err(EngineError::Invalid)?;
        let (out, rx) = mpsc::channel(self.event_buffer);
        let job = Job {
            req,
            out,
            queued: Instant::now(),
        };
        self.queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match self.tx.try_send(job) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.queued.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                Err(match e {
                    std_mpsc::TrySendError::Full(_) => {
                        EngineError::Busy(self.queued.load(std::sync::atomic::Ordering::SeqCst))
                    }
                    std_mpsc::TrySendError::Disconnected(_) => EngineError::Stopped,
                })
            }
        }
    }

    /// Runs a request to completion and collects its text, tool calls and usage.
    /// Blocking: for CLIs, benchmarks and tests, not for async code.
    pub fn generate_blocking(&self, req: Request) -> Result<Completion, EngineError> {
        let mut rx = self.submit(req)?;
        let mut c = Completion::default();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Delta(t) => c.text.push_str(&t),
                Event::ToolCall { call, error } => c.calls.push((call, error)),
                Event::ToolCallMalformed { reason, .. } => c.malformed.push(reason),
                Event::Done(u) => c.usage = Some(u),
                Event::Error(e) => return Err(EngineError::Internal(e)),
            }
        }
        Ok(c)
    }

    /// Requests waiting for the engine thread (not counting the one it serves).
    pub fn queued(&self) -> usize {
        self.queued.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn stats(&self) -> EngineStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Everything one request produced.
#[derive(Debug, Default)]
pub struct Completion {
    pub text: String,
    pub calls: Vec<(ToolCall, Option<String>)>,
    pub malformed: Vec<String>,
    pub usage: Option<Usage>,
}

/// The engine thread's state.
struct Worker {
    model: Transformer,
    tok: Arc<Tokenizer>,
    prompt: Arc<PromptBuilder>,
    pool: KvPool,
    constraints: Option<ConstraintFactory>,
    info: Arc<ModelInfo>,
}

impl Worker {
    fn load(m: &ResolvedModel, opts: &EngineOptions) -> Result<Self, EngineError> {
        let t0 = Instant::now();
        let g = GgufFile::open(&m.path)?;
        let tok = Arc::new(Tokenizer::from_gguf(&g)?);
        let source = match &opts.template_override {
            Some(s) => s.clone(),
            None => g
                .str("tokenizer.chat_template")
                .map_err(|_| TemplateError::Missing)?
                .to_owned(),
        };
        let name_of = |key: &str| {
            g.u32(key)
                .ok()
                .and_then(|id| tok.token_str(id))
                .unwrap_or("")
                .to_owned()
        };
        let template = ChatTemplate::new(
            &source,
            &name_of("tokenizer.ggml.bos_token_id"),
            &name_of("tokenizer.ggml.eos_token_id"),
        )?;
        let prompt = Arc::new(PromptBuilder::new(template, opts.prompts.clone()));
        let model = Transformer::load(&g, &candle_core::Device::Cpu, opts.load)?;
        let n_vocab = model.cfg.vocab_size.max(tok.vocab_size());
        let info = Arc::new(ModelInfo {
            name: m.name.clone(),
            arch: model.cfg.arch.clone(),
            context_length: model.cfg.context_length,
            n_vocab,
            tokenizer: tok.clone(),
            prompt: prompt.clone(),
            load_ms: t0.elapsed().as_secs_f64() * 1000.0,
        });
        Ok(Self {
            model,
            tok,
            prompt,
            pool: KvPool::new(opts.kv_budget_bytes),
            constraints: None,
            info,
        })
    }

    fn serve(&mut self, job: Job, stats: &Mutex<EngineStats>) {
        let out = job.out.clone();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(job)));
        let mut usage = None;
        let err = match result {
            Ok(Ok(u)) => {
                usage = Some(u);
                None
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(p) => Some(format!(
                "internal error (panic): {}",
                p.downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown")
            )),
        };
        if let Some(e) = err {
            let _ = out.blocking_send(Event::Error(e));
        }
        if let Ok(mut s) = stats.lock() {
            s.requests += 1;
            if let Some(u) = usage {
                if u.finish == FinishReason::Cancelled {
                    s.cancelled += 1;
                }
                s.last = Some(u);
            }
            s.kv_sessions = self.pool.sessions();
            s.kv_bytes = self.pool.bytes();
            s.kv_evictions = self.pool.evictions;
        }
    }

    fn constraint(&mut self, tools: &ToolSet, require_call: bool) -> Result<ToolConstraint, EngineError> {
        if self.constraints.is_none() {
            self.constraints = Some(ConstraintFactory::new(self.tok.clone(), self.info.n_vocab)?);
        }
        Ok(self.constraints.as_ref().expect("built above").for_tools(tools, require_call)?)
    }

    fn run(&mut self, job: Job) -> Result<Usage, EngineError> {
        let Job { req, out, queued } = job;
        let start = Instant::now();
        if out.is_closed() {
            // Cancelled while it waited in the queue: do no work for it.
            return Ok(Usage {
                prompt_tokens: 0,
                cached_tokens: 0,
                completion_tokens: 0,
                finish: FinishReason::Cancelled,
                ttft_ms: 0.0,
                prefill_ms: 0.0,
                decode_ms: 0.0,
                queue_ms: start.duration_since(queued).as_secs_f64() * 1000.0,
            });
        }
        let queue_ms = start.duration_since(queued).as_secs_f64() * 1000.0;
        let (tokens, tools) = match &req.prompt {
            Prompt::Chat { messages, tools, lang } => {
                let schemas = tools.as_ref().map(|t| t.template_json(lang)).unwrap_or_default();
                (
                    self.prompt.tokens(&self.tok, messages, &schemas)?,
                    tools.clone().filter(|t| !t.is_empty()),
                )
            }
            Prompt::Text(t) => (self.tok.encode(t, true)?, None),
            Prompt::Tokens(t) => (t.clone(), None),
        };
        let context = self.model.cfg.context_length;
        if tokens.is_empty() {
            return Err(EngineError::Invalid("the prompt is empty".into()));
        }
        if tokens.len() >= context {
            return Err(EngineError::PromptTooLong {
                prompt: tokens.len(),
                context,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.info.n_vocab) {
            return Err(EngineError::Invalid(format!("token id {bad} is outside the vocabulary")));
        }
        let max_tokens = req.max_tokens.min(context - tokens.len());
        let mut constraint = match (&tools, req.constrain_tools) {
            (Some(t), true) => match &req.grammar_tools {
                Some(g) => Some(self.constraint(g, req.require_call)?),
                None => Some(self.constraint(t, req.require_call)?),
            },
            _ => None,
        };

        // KV reuse: keep the longest common prefix with the session's cache.
        // A session seen for the first time starts from the longest prefix
        // another session holds (the system prompt and tools are shared).
        let (mut cache, mut in_cache) = req
            .session
            .as_deref()
            .and_then(|s| self.pool.checkout(s))
            .or_else(|| self.pool.shared_prefix(&tokens, SHARED_PREFIX_MIN, crate::model::PREFILL_CHUNK))
            .unwrap_or_else(|| (self.model.new_cache(), Vec::new()));
        let mut reuse = common_prefix(&in_cache, &tokens).min(cache.len());
        if reuse == tokens.len() {
            reuse -= 1; // the last prompt token must run to give logits
        }
        cache.truncate(reuse);
        in_cache.truncate(reuse);

        let checkin = |pool: &mut KvPool, cache, toks| {
            if let Some(s) = &req.session {
                pool.checkin(s, cache, toks);
            }
        };

        let mut logits = match self.model.forward(&tokens[reuse..], &mut cache) {
            Ok(l) => l,
            Err(e) => {
                // The cache may be half-written: do not keep it.
                return Err(e.into());
            }
        };
        in_cache.extend_from_slice(&tokens[reuse..]);
        let prefill_ms = start.elapsed().as_secs_f64() * 1000.0;

        let mut sampler = Sampler::new(req.sampling);
        let mut text = TextStream::new(req.stop.clone());
        let mut calls = tools.as_ref().map(|_| CallStream::new());
        let mut generated = 0usize;
        let mut ttft_ms = 0.0;
        let decode_start = Instant::now();
        let mut finish = FinishReason::Length;
        let emit = |items: Vec<StreamItem>, out: &mpsc::Sender<Event>| -> bool {
            for item in items {
                let ev = match item {
                    StreamItem::Text(t) if t.is_empty() => continue,
                    StreamItem::Text(t) => Event::Delta(t),
                    StreamItem::Call(call) => {
                        let error = tools.as_ref().and_then(|t| t.check(&call).err());
                        Event::ToolCall { call, error }
                    }
                    StreamItem::Malformed { reason, raw } => Event::ToolCallMalformed { reason, raw },
                };
                if out.blocking_send(ev).is_err() {
                    return false;
                }
            }
            true
        };
        let route = |s: String, calls: &mut Option<CallStream>| -> Vec<StreamItem> {
            match calls {
                Some(c) => c.push(&s),
                None => vec![StreamItem::Text(s)],
            }
        };

        // A failure while decoding leaves the cache consistent with
        // `in_cache` (a forward pass only commits its length at the end), so
        // the session keeps its cache and the error is reported after.
        let mut failure: Option<EngineError> = None;
        while generated < max_tokens {
            if out.is_closed() {
                finish = FinishReason::Cancelled;
                break;
            }
            if let Some(c) = constraint.as_mut() {
                if let Err(e) = c.mask(&mut logits) {
                    failure = Some(e.into());
                    break;
                }
            }
            let history_len = in_cache.len();
            let Some(tok) = sampler.sample(&mut logits, &in_cache[..history_len]) else {
                failure = Some(EngineError::Internal(
                    "no token can be sampled (every logit is masked)".into(),
                ));
                break;
            };
            if generated == 0 {
                ttft_ms = start.elapsed().as_secs_f64() * 1000.0;
            }
            if self.tok.is_eog(tok) {
                finish = FinishReason::Stop;
                break;
            }
            if let Some(c) = constraint.as_mut() {
                if let Err(e) = c.consume(tok) {
                    failure = Some(e.into());
                    break;
                }
            }
            generated += 1;
            let step = text.push(self.tok.token_bytes(tok));
            if !step.text.is_empty() && !emit(route(step.text, &mut calls), &out) {
                finish = FinishReason::Cancelled;
                break;
            }
            if step.stopped {
                finish = FinishReason::StopString;
                break;
            }
            if generated >= max_tokens {
                break;
            }
            match self.model.forward(&[tok], &mut cache) {
                Ok(l) => logits = l,
                Err(e) => {
                    failure = Some(e.into());
                    break;
                }
            }
            in_cache.push(tok);
        }
        if let Some(e) = failure {
            checkin(&mut self.pool, cache, in_cache);
            return Err(e);
        }
        let decode_ms = decode_start.elapsed().as_secs_f64() * 1000.0;
        if finish != FinishReason::Cancelled {
            let rest = text.finish();
            let mut items = if rest.is_empty() { Vec::new() } else { route(rest, &mut calls) };
            if let Some(c) = calls.as_mut() {
                items.extend(c.finish());
            }
            emit(items, &out);
        }
        let usage = Usage {
            prompt_tokens: tokens.len(),
            cached_tokens: reuse,
            completion_tokens: generated,
            finish,
            ttft_ms,
            prefill_ms,
            decode_ms,
            queue_ms,
        };
        checkin(&mut self.pool, cache, in_cache);
        let _ = out.blocking_send(Event::Done(usage.clone()));
        Ok(usage)
    }
}
