//! The inference engine: one thread that owns the model and every session's
//! KV cache, fed through a bounded queue, serving many requests at once.
//!
//! Callers (the chat REPL, the server, the evaluator) send a [`Request`]
//! carrying its own reply channel and get [`Event`]s back: text deltas, tool
//! calls, and a final `Done` with usage and timings. Errors travel as events
//! too. Forward passes never run on async worker threads: the engine thread
//! is a plain OS thread, and `submit` only enqueues. A full queue answers
//! [`EngineError::Busy`] at once instead of waiting.
//!
//! Continuous batching: the engine thread loops over rounds. Each round it
//! admits queued requests, oldest first, while fewer than
//! [`EngineOptions::max_batch`] run and their KV caches (prompt plus
//! `max_tokens`, at most) fit the KV budget next to running ones (idle
//! sessions' caches are evicted first); then it prefills one chunk of the
//! oldest request still reading its prompt, so a long prompt delays the
//! others by at most one chunk per round; then it samples one token for
//! every decoding request and runs all those tokens through the model in
//! one batched step ([`Transformer::forward_batch`]), which streams the
//! weights once for the whole batch. A second turn of a session that is
//! running waits until the first ends, so it can reuse that cache. Each
//! request's rows are computed exactly as they would be alone, so batching
//! does not change greedy outputs.
//!
//! Cancellation: when the receiver of a request's events is dropped, the
//! engine notices before computing that request's next token and stops it.

pub mod detok;
pub mod kv_pool;
pub mod sampler;

use crate::catalog::ResolvedModel;
use crate::gguf::{GgufError, GgufFile};
use crate::model::{KvCache, LoadOptions, ModelError, Transformer};
use crate::prompt::{PromptBuilder, PromptError, Prompts};
use crate::template::{ChatTemplate, Message, TemplateError};
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::tools::grammar::{ConstraintFactory, GrammarError, ToolConstraint};
use crate::tools::{CallStream, StreamItem, ToolCall, ToolSet};
use detok::TextStream;
use kv_pool::{common_prefix, next_boundary, shares_exactly, Chunking, KvPool};
use sampler::{Sampler, SamplingParams};
use serde::Serialize;
use std::sync::mpsc as std_mpsc;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
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
/// many tokens of prefill (a copy costs memory bandwidth too, about 24 KB a
/// position for the default model, far less than computing it).
const SHARED_PREFIX_MIN: usize = 16;

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
    /// A request without a cache of its own starts from another session's
    /// cached prefix (the system prompt and tools) where that gives exactly
    /// the bits it would compute itself. Off, it computes its whole prompt
    /// (benchmarks measuring a cold prefill).
    pub share_prefix: bool,
    /// A Lark grammar the whole reply must match (the dialogue manager's
    /// commands); it replaces any tool constraint. The reply streams as text.
    pub grammar: Option<Arc<str>>,
    /// The tool constraint, already compiled off the engine thread
    /// ([`Engine::compile_tools`]); empty: the engine compiles it.
    pub compiled: Compiled,
}

/// A tool constraint compiled before its request was queued. A client's
/// tool schemas can be large and many; compiling them on the engine thread
/// held up every session's tokens (issue 23, finding 8), so a server
/// compiles them on a blocking thread and hands the result over here.
#[derive(Clone, Default)]
pub struct Compiled(Arc<Mutex<Option<ToolConstraint>>>);

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compiled(…)")
    }
}

impl Compiled {
    fn take(&self) -> Option<ToolConstraint> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The constraint factory (vocabulary trie and parser factory), built once
/// on first use and shared by the engine thread and request handlers.
#[derive(Clone, Default)]
struct Factory {
    built: Arc<Mutex<Option<Arc<ConstraintFactory>>>>,
    /// Tool constraints compiled on the engine thread (a client's never are).
    on_engine: Arc<std::sync::atomic::AtomicU64>,
}

impl Factory {
    fn get(&self, info: &ModelInfo) -> Result<Arc<ConstraintFactory>, EngineError> {
        let mut g = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(Arc::new(ConstraintFactory::new(info.tokenizer.clone(), info.n_vocab)?));
        }
        Ok(g.as_ref().expect("built above").clone())
    }
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
            grammar: None,
            share_prefix: true,
            compiled: Default::default(),
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
    /// Events buffered per request. The engine never waits for a reader: one
    /// that lets the buffer fill has its request ended (as if cancelled).
    pub event_buffer: usize,
    /// Requests decoded together in one batched step at most (continuous
    /// batching); 1 serves one request at a time.
    pub max_batch: usize,
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
            max_batch: 16,
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
    constraints: Factory,
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
    /// Most requests decoded together in one batched step so far.
    pub peak_batch: usize,
    /// Tool-call constraints compiled on the engine thread (requests that
    /// came without [`Request::compiled`]: the agent's own).
    pub grammars_on_engine_thread: u64,
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
        let constraints = Factory::default();
        let shared = constraints.clone();
        std::thread::Builder::new()
            .name("errand-engine".into())
            .spawn(move || match Worker::load(&model, &opts) {
                Ok(mut w) => {
                    w.constraints = shared;
                    let _ = ready_tx.send(Ok(w.info.clone()));
                    w.schedule(rx, &queued2, &stats2);
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
            constraints,
            queued,
            stats,
            event_buffer,
        })
    }

    /// Compiles the constraint for a reply with these tools on the calling
    /// thread (a server calls it on a blocking thread), for
    /// [`Request::compiled`]: the engine thread then never compiles a
    /// client's schemas.
    pub fn compile_tools(&self, tools: &ToolSet, require_call: bool) -> Result<Compiled, EngineError> {
        let c = self.constraints.get(&self.info)?.for_tools(tools, require_call)?;
        Ok(Compiled(Arc::new(Mutex::new(Some(c)))))
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
        let mut s = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
        s.grammars_on_engine_thread = self.constraints.on_engine.load(std::sync::atomic::Ordering::Relaxed);
        s
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
    constraints: Factory,
    info: Arc<ModelInfo>,
    /// Requests decoded together at most.
    max_batch: usize,
    /// KV memory for running requests and idle sessions together.
    kv_budget: usize,
    kv_bytes_per_position: usize,
    /// The control token that starts each message of a rendered
    /// conversation (`<|im_start|>` in ChatML), if the vocabulary has one.
    turn_start: Option<u32>,
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
        // Keys and values, f32, for every layer.
        let kv_bytes_per_position = 2 * model.cfg.n_layer * model.cfg.n_kv_head * model.cfg.head_dim * 4;
        let info = Arc::new(ModelInfo {
            name: m.name.clone(),
            arch: model.cfg.arch.clone(),
            context_length: model.cfg.context_length,
            n_vocab,
            tokenizer: tok.clone(),
            prompt: prompt.clone(),
            load_ms: t0.elapsed().as_secs_f64() * 1000.0,
        });
        let turn_start = ["<|im_start|>", "<|start_header_id|>", "<start_of_turn>"].iter().find_map(|t| tok.token_id(t));
        Ok(Self {
            model,
            tok,
            prompt,
            pool: KvPool::new(opts.kv_budget_bytes),
            constraints: Factory::default(),
            info,
            max_batch: opts.max_batch.max(1),
            kv_budget: opts.kv_budget_bytes,
            kv_bytes_per_position,
            turn_start,
        })
    }

    /// The constraint factory, built on first use.
    fn factory(&mut self) -> Result<Arc<ConstraintFactory>, EngineError> {
        self.constraints.get(&self.info)
    }

    fn constraint(&mut self, tools: &ToolSet, require_call: bool) -> Result<ToolConstraint, EngineError> {
        self.constraints.on_engine.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(self.factory()?.for_tools(tools, require_call)?)
    }

    /// The scheduler: admits queued requests (oldest first) while the batch
    /// has room, advances one prompt by one prefill chunk, then samples the
    /// next token of every decoding request and runs those tokens through
    /// the model together in one batched step. Returns when every handle is
    /// gone and nothing is left to serve.
    fn schedule(&mut self, rx: std_mpsc::Receiver<Job>, queued: &AtomicUsize, stats: &Mutex<EngineStats>) {
        let mut active: Vec<Seq> = Vec::new();
        // Requests for a session that is already being served wait here, in
        // order, so that a session's turns never run concurrently; so do
        // requests that the KV memory budget cannot take yet.
        let mut held: VecDeque<Job> = VecDeque::new();
        let mut closed = false;
        let (mut trimmed_at, mut trimmed_evictions) = (Instant::now(), 0u64);
        loop {
            // 0. Evicted caches leave free holes in the allocator's heap,
            // which glibc keeps (part of the load campaign's RSS growth; the
            // rest was the KV caches filling toward their budget). After
            // evictions, free pages go back to the system, at most once a
            // second. (A fixed mmap threshold did it too, but its page
            // faults cost a quarter of the turns.)
            if self.pool.evictions != trimmed_evictions && trimmed_at.elapsed() >= std::time::Duration::from_secs(1) {
                trimmed_evictions = self.pool.evictions;
                trimmed_at = Instant::now();
                release_free_memory();
            }
            // 1. Admission.
            while active.len() < self.max_batch {
                let pos = held.iter().position(|j| !session_busy(&active, j));
                let job = if let Some(i) = pos {
                    held.remove(i).expect("index from position")
                } else if closed {
                    break;
                } else if active.is_empty() && held.is_empty() {
                    match rx.recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    }
                } else {
                    match rx.try_recv() {
                        Ok(j) => j,
                        Err(std_mpsc::TryRecvError::Empty) => break,
                        Err(std_mpsc::TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                };
                if pos.is_none() {
                    queued.fetch_sub(1, Ordering::SeqCst);
                }
                if session_busy(&active, &job) {
                    held.push_back(job);
                    continue;
                }
                let reserved: usize = active.iter().map(|s| s.reserve).sum();
                let out = job.out.clone();
                match catch(|| self.admit(job, reserved, active.is_empty())) {
                    Ok(Admit::Run(seq)) => active.push(*seq),
                    Ok(Admit::Wait(job)) => {
                        // No room in the KV budget until a request finishes.
                        held.push_front(*job);
                        break;
                    }
                    Ok(Admit::Done(usage)) => record(stats, &self.pool, Some(&usage)),
                    Err(e) => {
                        let _ = out.try_send(Event::Error(e));
                        record(stats, &self.pool, None);
                    }
                }
            }
            if active.is_empty() {
                if closed && held.is_empty() {
                    return;
                }
                continue;
            }
            let stepped = catch(|| {
                self.step(&mut active, stats);
                Ok(())
            });
            if let Err(msg) = stepped {
                // A panic mid-step: the caches may be half-written, so every
                // request in flight is failed and its cache dropped.
                for s in active.drain(..) {
                    let _ = s.out.try_send(Event::Error(msg.clone()));
                    record(stats, &self.pool, None);
                }
            }
        }
    }

    /// Tokenizes and checks a request and finds its cache; `Wait` when the
    /// KV budget (less `reserved` by running requests) cannot take it yet
    /// and `alone` is false.
    fn admit(&mut self, job: Job, reserved: usize, alone: bool) -> Result<Admit, EngineError> {
        let start = Instant::now();
        let queue_ms = start.duration_since(job.queued).as_secs_f64() * 1000.0;
        if job.out.is_closed() {
            // Cancelled while it waited in the queue: do no work for it.
            return Ok(Admit::Done(Usage {
                prompt_tokens: 0,
                cached_tokens: 0,
                completion_tokens: 0,
                finish: FinishReason::Cancelled,
                ttft_ms: 0.0,
                prefill_ms: 0.0,
                decode_ms: 0.0,
                queue_ms,
            }));
        }
        let req = &job.req;
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
        // Where the first message (system prompt and tools) ends: the second
        // turn-start control token of a rendered conversation (control text
        // inside messages is tokenized as plain text, so it cannot fake one).
        let segment = match (&req.prompt, self.turn_start) {
            (Prompt::Chat { .. }, Some(ts)) => tokens.iter().enumerate().filter(|(_, &t)| t == ts).nth(1).map(|(i, _)| i),
            _ => None,
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
        let reserve = (tokens.len() + max_tokens) * self.kv_bytes_per_position;
        if !alone && reserved + reserve > self.kv_budget {
            return Ok(Admit::Wait(Box::new(job)));
        }
        // Idle sessions' caches give way to running requests.
        self.pool.shrink_to(self.kv_budget.saturating_sub(reserved + reserve));
        let precompiled = req.compiled.take();
        let constraint = match (&tools, req.constrain_tools) {
            _ if req.grammar.is_some() => Some(self.factory()?.for_lark(req.grammar.as_deref().unwrap_or_default())?),
            (Some(_), true) if precompiled.is_some() => precompiled,
            (Some(t), true) => match &req.grammar_tools {
                Some(g) => Some(self.constraint(g, req.require_call)?),
                None => Some(self.constraint(t, req.require_call)?),
            },
            _ => None,
        };

        // KV reuse: keep the longest common prefix with the session's cache.
        // A session seen for the first time starts from the longest prefix
        // another session holds exactly (the system prompt and tools are
        // shared; see `kv_pool`).
        let (mut cache, mut in_cache, donor) = req
            .session
            .as_deref()
            .and_then(|s| self.pool.checkout(s))
            .or_else(|| req.share_prefix.then(|| self.pool.shared_prefix(&tokens, SHARED_PREFIX_MIN, segment)).flatten())
            .unwrap_or_else(|| (self.model.new_cache(), Vec::new(), Chunking::default()));
        let mut reuse = common_prefix(&in_cache, &tokens).min(cache.len());
        if reuse == tokens.len() {
            reuse -= 1; // the last prompt token must run to give logits
        }
        cache.truncate(reuse);
        in_cache.truncate(reuse);
        // The rest of the prompt is prefilled in canonical chunks from
        // `reuse`; the whole prompt is then exact if what it kept was.
        let chunking = if shares_exactly(donor, segment, reuse) {
            Chunking { segment, exact: tokens.len() }
        } else {
            Chunking { segment: donor.segment, exact: donor.exact.min(reuse) }
        };
        let Job { req, out, .. } = job;
        Ok(Admit::Run(Box::new(Seq {
            calls: tools.as_ref().map(|_| CallStream::new()),
            tools,
            session: req.session,
            start,
            queue_ms,
            prompt_tokens: tokens.len(),
            reuse,
            pending: tokens[reuse..].to_vec(),
            segment,
            chunking,
            cache,
            in_cache,
            keep_cache: true,
            logits: None,
            constraint,
            sampler: Sampler::new(req.sampling),
            text: TextStream::new(req.stop),
            generated: 0,
            max_tokens,
            ttft_ms: 0.0,
            prefill_ms: 0.0,
            decode_start: None,
            reserve,
            out,
        })))
    }

    /// One round: a prefill chunk for the oldest request still reading its
    /// prompt, then one token for every request that is decoding.
    fn step(&mut self, active: &mut Vec<Seq>, stats: &Mutex<EngineStats>) {
        let mut done: Vec<(usize, Result<FinishReason, EngineError>)> = Vec::new();
        if let Some(i) = active.iter().position(|s| !s.pending.is_empty()) {
            let s = &mut active[i];
            if s.out.is_closed() {
                done.push((i, Ok(FinishReason::Cancelled)));
            } else if let Err(e) = s.prefill_chunk(&self.model) {
                // The cache may be half-written: do not keep it.
                s.keep_cache = false;
                done.push((i, Err(e)));
            }
        }
        let mut next: Vec<(usize, u32)> = Vec::new();
        for (i, s) in active.iter_mut().enumerate() {
            if s.logits.is_none() || done.iter().any(|(d, _)| *d == i) {
                continue;
            }
            match s.decide(&self.tok) {
                Decision::Next(t) => next.push((i, t)),
                Decision::Finished(r) => done.push((i, Ok(r))),
                Decision::Failed(e) => done.push((i, Err(e))),
            }
        }
        if let Ok(mut st) = stats.lock() {
            st.peak_batch = st.peak_batch.max(next.len());
        }
        // A failure while decoding leaves each cache consistent with its
        // `in_cache` (a forward pass only commits its length at the end), so
        // sessions keep their caches and the error is reported after.
        match next.as_slice() {
            [] => {}
            [(i, t)] => match self.model.forward(&[*t], &mut active[*i].cache) {
                Ok(l) => active[*i].advance(*t, l),
                Err(e) => done.push((*i, Err(e.into()))),
            },
            _ => {
                let toks: Vec<u32> = next.iter().map(|(_, t)| *t).collect();
                let mut caches: Vec<&mut KvCache> = active
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| next.iter().any(|(n, _)| n == i))
                    .map(|(_, s)| &mut s.cache)
                    .collect();
                match self.model.forward_batch(&toks, &mut caches) {
                    Ok(all) => {
                        for ((i, t), l) in next.iter().zip(all) {
                            active[*i].advance(*t, l);
                        }
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        for (i, _) in &next {
                            done.push((*i, Err(EngineError::Internal(msg.clone()))));
                        }
                    }
                }
            }
        }
        done.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, result) in done {
            let s = active.remove(i);
            let usage = s.finish(result, &mut self.pool);
            record(stats, &self.pool, usage.as_ref());
        }
    }
}

enum Admit {
    Run(Box<Seq>),
    /// Not now: the KV memory budget is taken by running requests.
    Wait(Box<Job>),
    /// Finished without running (cancelled while queued).
    Done(Usage),
}

enum Decision {
    Next(u32),
    Finished(FinishReason),
    Failed(EngineError),
}

/// A request being served: the prompt tokens it has yet to prefill, or the
/// logits for its next token, and what turns tokens into events.
struct Seq {
    out: mpsc::Sender<Event>,
    session: Option<String>,
    tools: Option<Arc<ToolSet>>,
    start: Instant,
    queue_ms: f64,
    prompt_tokens: usize,
    reuse: usize,
    pending: Vec<u32>,
    /// Where the prompt's first message ends (prefill chunks stop there).
    segment: Option<usize>,
    /// How `cache` was computed, for sharing it with other sessions.
    chunking: Chunking,
    cache: KvCache,
    /// The tokens whose keys and values `cache` holds.
    in_cache: Vec<u32>,
    keep_cache: bool,
    logits: Option<Vec<f32>>,
    constraint: Option<ToolConstraint>,
    sampler: Sampler,
    text: TextStream,
    calls: Option<CallStream>,
    generated: usize,
    max_tokens: usize,
    ttft_ms: f64,
    prefill_ms: f64,
    decode_start: Option<Instant>,
    /// KV bytes this request may grow to (prompt plus `max_tokens`).
    reserve: usize,
}

impl Seq {
    fn prefill_chunk(&mut self, model: &Transformer) -> Result<(), EngineError> {
        let pos = self.cache.len();
        let n = self.pending.len().min(next_boundary(self.segment, pos) - pos);
        let logits = model.forward(&self.pending[..n], &mut self.cache)?;
        self.in_cache.extend(self.pending.drain(..n));
        if self.pending.is_empty() {
            self.logits = Some(logits);
            self.prefill_ms = self.start.elapsed().as_secs_f64() * 1000.0;
            self.decode_start = Some(Instant::now());
        }
        Ok(())
    }

    fn advance(&mut self, tok: u32, logits: Vec<f32>) {
        self.in_cache.push(tok);
        self.logits = Some(logits);
    }

    /// Samples the next token from the pending logits and streams it.
    fn decide(&mut self, tok: &Tokenizer) -> Decision {
        if self.out.is_closed() {
            return Decision::Finished(FinishReason::Cancelled);
        }
        if self.generated >= self.max_tokens {
            return Decision::Finished(FinishReason::Length);
        }
        let Some(mut logits) = self.logits.take() else {
            return Decision::Failed(EngineError::Internal("decoding without logits".into()));
        };
        if let Some(c) = self.constraint.as_mut() {
            if let Err(e) = c.mask(&mut logits) {
                return Decision::Failed(e.into());
            }
        }
        let Some(t) = self.sampler.sample(&mut logits, &self.in_cache) else {
            return Decision::Failed(EngineError::Internal(
                "no token can be sampled (every logit is masked)".into(),
            ));
        };
        if self.generated == 0 {
            self.ttft_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        }
        if tok.is_eog(t) {
            return Decision::Finished(FinishReason::Stop);
        }
        if let Some(c) = self.constraint.as_mut() {
            if let Err(e) = c.consume(t) {
                return Decision::Failed(e.into());
            }
        }
        self.generated += 1;
        let step = self.text.push(tok.token_bytes(t));
        if !step.text.is_empty() {
            let items = self.route(step.text);
            if !self.emit(items) {
                return Decision::Finished(FinishReason::Cancelled);
            }
        }
        if step.stopped {
            return Decision::Finished(FinishReason::StopString);
        }
        if self.generated >= self.max_tokens {
            return Decision::Finished(FinishReason::Length);
        }
        Decision::Next(t)
    }

    fn route(&mut self, s: String) -> Vec<StreamItem> {
        match self.calls.as_mut() {
            Some(c) => c.push(&s),
            None => vec![StreamItem::Text(s)],
        }
    }

    /// Sends items as events; false when the receiver has gone, or has
    /// stopped reading and let its whole buffer fill: the engine thread
    /// serves every session and never waits for one client (a blocking send
    /// here froze the model for everyone behind a reader that stopped).
    /// The request then ends as if cancelled.
    fn emit(&self, items: Vec<StreamItem>) -> bool {
        for item in items {
            let ev = match item {
                StreamItem::Text(t) if t.is_empty() => continue,
                StreamItem::Text(t) => Event::Delta(t),
                StreamItem::Call(call) => {
                    let error = self.tools.as_ref().and_then(|t| t.check(&call).err());
                    Event::ToolCall { call, error }
                }
                StreamItem::Malformed { reason, raw } => Event::ToolCallMalformed { reason, raw },
            };
            if self.out.try_send(ev).is_err() {
                return false;
            }
        }
        true
    }

    /// Ends the request: flushes held-back text, returns the cache to the
    /// pool, sends `Done` (or the error). Returns the usage when it finished.
    fn finish(mut self, result: Result<FinishReason, EngineError>, pool: &mut KvPool) -> Option<Usage> {
        let keep = |pool: &mut KvPool, s: &mut Seq| {
            if let (Some(id), true) = (&s.session, s.keep_cache) {
                let cache = std::mem::replace(&mut s.cache, KvCache::new(0));
                pool.checkin(id, cache, std::mem::take(&mut s.in_cache), s.chunking);
            }
        };
        let finish = match result {
            Ok(f) => f,
            Err(e) => {
                keep(pool, &mut self);
                let _ = self.out.try_send(Event::Error(e.to_string()));
                return None;
            }
        };
        let decode_ms = self.decode_start.map(|t| t.elapsed().as_secs_f64() * 1000.0).unwrap_or(0.0);
        if finish != FinishReason::Cancelled {
            let rest = self.text.finish();
            let mut items = if rest.is_empty() { Vec::new() } else { self.route(rest) };
            if let Some(c) = self.calls.as_mut() {
                items.extend(c.finish());
            }
            self.emit(items);
        }
        let usage = Usage {
            prompt_tokens: self.prompt_tokens,
            cached_tokens: self.reuse,
            completion_tokens: self.generated,
            finish,
            ttft_ms: self.ttft_ms,
            prefill_ms: self.prefill_ms,
            decode_ms,
            queue_ms: self.queue_ms,
        };
        if trace_enabled() {
            eprintln!(
                "[engine] prompt {} (cached {}) → {} tokens, {:?}; queue {:.0} ms, prefill {:.0} ms, decode {:.0} ms ({:.1} tok/s)",
                usage.prompt_tokens,
                usage.cached_tokens,
                usage.completion_tokens,
                usage.finish,
                usage.queue_ms,
                usage.prefill_ms,
                usage.decode_ms,
                usage.decode_tok_per_s()
            );
        }
        keep(pool, &mut self);
        let _ = self.out.try_send(Event::Done(usage.clone()));
        Some(usage)
    }
}

/// `ERRAND_TRACE=1` prints one line per finished request to stderr.
fn trace_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("ERRAND_TRACE").is_some_and(|v| !v.is_empty() && v != "0"))
}

fn session_busy(active: &[Seq], job: &Job) -> bool {
    job.req.session.is_some() && active.iter().any(|s| s.session == job.req.session)
}

/// Runs `f`, turning an error or a panic into the message its reader gets.
fn catch<T>(f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(p) => Err(format!(
            "internal error (panic): {}",
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("unknown")
        )),
    }
}

fn record(stats: &Mutex<EngineStats>, pool: &KvPool, usage: Option<&Usage>) {
    if let Ok(mut s) = stats.lock() {
        s.requests += 1;
        if let Some(u) = usage {
            if u.finish == FinishReason::Cancelled {
                s.cancelled += 1;
            }
            s.last = Some(u.clone());
        }
        s.kv_sessions = pool.sessions();
        s.kv_bytes = pool.bytes();
        s.kv_evictions = pool.evictions;
    }
}

/// Returns the allocator's free pages to the system (glibc's `malloc_trim`;
/// elsewhere nothing).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}
