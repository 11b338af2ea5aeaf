//! # Errand
//!
//! A local-first conversational life assistant. Everything runs in this
//! process: the LLM on candle (CPU by default), tool calling against
//! mini-program services, confirmations and payments in sandbox
//! mini-programs, and the server that chat clients, embedding mini-programs
//! and OpenAI-style tools talk to, and personal memory with a
//! recommendation feed on embedded Qdrant.
//!
//! ## Architecture map
//!
//! ```text
//!  models/catalog.toml ──► catalog ──► ResolvedModel (a GGUF on disk; models/fetch.py fetches)
//!                                          │
//!                          gguf ── GgufFile (header, metadata, lazily read tensors)
//!                         ╱   │   ╲
//!                tokenizer  template  model ── Transformer (qwen2, llama) + KvCache
//!                   └──► prompt ◄── prompts/        │  qkernel: VNNI/AVX2 Q5_0/Q8_0 products on
//!                                 │                 │  blocks repacked 16 rows wide, fused attention;
//!                                 │                 │  forward_batch for decode
//!                                 │                 ▼
//!                                 ▼        engine (one OS thread, bounded queue, rounds:
//!                                            │  admit, one prefill chunk, one batched decode step)
//!                                            ├─ kv_pool: per-session caches, LRU budget,
//!                                            │  a new session starts from another's prefix
//!                                            ├─ sampler, detok (UTF-8 safe), stop strings
//!                                            └─ tools::grammar: llguidance mask per request
//!                                                 ▲ Request / Event stream ▼
//!  chat REPL ──Input──► agent (per-session state)
//!  server::hub ─┘         ├─ flows (apps whose manifests declare flows; dialogue/):
//!        ▲                │    one constrained model call per message → commands
//!        │                │    (start, set, pick, cancel, clarify, chat, none) over the
//!        │                │    candidate flows (app and flow keywords) → values copied from
//!        │                │    the message by grammar, checked against the words; code reads
//!        │                │    what it can exactly (places by role, addresses, enum changes,
//!        │                │    dates, times, options by name/brand/time/order) and wins
//!        │                │    (dialogue::value) → executor runs
//!        │                │    the top flow's steps: ask · call · card · quote; a flow stack
//!        │                │    for interruptions and a second task in the same message;
//!        │                │    tools' roles (status, order id, final statuses) from manifests;
//!        │                │    the model writes only chat replies
//!        │                ├─ generic path (apps without flows): model rounds of tool calls;
//!        │                │    route (manifest `keywords`), dialogue::ground (arguments from
//!        │                │    the user or tool results, ids narrowed in the grammar)
//!        │                ├─ confirmation gate: quote → token → user's Confirm → run → pay
//!        │                ├─ present: cards, money, the agent's own sentences (en/zh/ko)
//!        │                └─ audit: every call, confirmation and payment in SQLite
//!        │                        │
//!        └── AgentEvent ◄──       ▼ adapter (trait; HTTP: timeouts, GET retries,
//!   (Token, Card, Confirmation,      Idempotency-Key on writes, schema checks)
//!    Payment, Notice, Done)           │ HTTP
//!                                     ▼
//!                sandbox: axum services on one listener, SQLite each, behind guard
//!                  pay ◄──signed notify──► merchant (in tickets, food, ride, salon, bike, mart)
//!                  merchants sign requests; a wallet pays only with its credential
//!
//!  server (errand serve, one axum listener behind guard (Host, Origin); auth: user
//!    tokens, app keys with scopes; model work over the queue shed in line, longest wait first)
//!    /v1/ws ── ws ──► hub: sessions owned by a user, numbered frame log (resume),
//!    │                client-id dedup, one worker per session → agent; bounded
//!    │                per-connection queues (slow readers are dropped, never waited on);
//!    │                order watchers push status changes; store: one interface
//!    │                (SQLite) for sessions, frame logs, agent states (written before
//!    │                a confirmation shows or money moves) and the order book (written
//!    │                before paying, reconciled at start); a restart resumes sessions
//!    /v1/chat/completions, /v1/models ── openai (SSE) ──► engine
//!    /v1/sessions, /v1/orders, /v1/apps (manifest upload), /healthz, /readyz, /metrics
//!    /v1/users/{id}/memories, /v1/users/{id}/feed ── server::personal ──┐
//!    /, /sdk.js, /widget.js ── web/ (chat page, JS SDK, one-tag widget)  │
//!                                                                        ▼
//!  memory: Memory (per-user memories: like, dislike, diet, fact, order) ◄── agent::personal
//!    ├─ keys: en/zh/ko lexicon → English tags; remember/forget/my usual/recommend by rules
//!    ├─ embed: all-MiniLM-L6-v2 on candle BERT (mean pool, L2), on blocking threads
//!    ├─ extract: preferences the model proposes (constrained call), checked against the words
//!    ├─ feed: sandbox /catalog indexed incrementally; ranking by profile, time, place, diversity
//!    └─ store: VectorStore ── EdgeStore (qdrant-edge, in-process, default)
//!                           └─ QdrantStore (qdrant-client, --qdrant-url)
//!
//!  eval (errand eval): evals/dialogues/*.yaml ── dialogue (checked, matchers compiled)
//!    run: per run a fresh world ── server::Server + seeded sandbox on the shared engine
//!    │    (one world::Clock, pinned), or --server; wallets, memories, past orders seeded
//!    ├─ client: each turn over /v1/ws as a chat client ── TurnRecord (calls, words,
//!    │          confirmations, payments, TTFT, tokens); sim: a model (--user-model) plays the user
//!    ├─ state: GET /v1/orders (joined with /catalog), /pay wallet ledger, memories
//!    ├─ score: reason codes + the invariant "no payment without confirmation"
//!    └─ report: pass^k, by domain and language ── render: terminal, JSON, HTML
//! ```
//!
//! - [`catalog`]: model names → files; the exact command to fetch what is missing.
//! - [`gguf`]: opening GGUF files with clear errors for corrupt or truncated ones.
//! - [`tokenizer`]: a byte-level BPE tokenizer from GGUF metadata that gives
//!   llama.cpp's token ids (checked by a fixture from `llama-tokenize`).
//! - [`template`]: the GGUF's chat template on minijinja, configured like
//!   Hugging Face's Jinja2 (checked by golden files rendered by Jinja2).
//! - [`prompt`]: system prompts from `prompts/`, the tool-list fallback for
//!   templates that ignore tools, and tokenization that keeps control-token
//!   text in user or tool content inert.
//! - [`model`]: the transformer forward pass with an external KV cache, one
//!   sequence or a batched decode step over many; `model::qkernel` holds
//!   Errand's own quantized CPU kernels (AVX-512 VNNI where the CPU has it,
//!   else AVX2, else scalar, bit-identical; `qkernel::packed`: Q5_0/Q8_0
//!   matrices repacked at load so one register holds 4 weights of 16 rows,
//!   each lane sums one row's whole block and the accumulators are 16
//!   output columns, for 1 to 16 activation rows a tile; the file-layout
//!   kernels serve matrices whose rows do not fill groups of 16; 8-bit
//!   products at every row count) and the fused causal attention
//!   (`qkernel::attention`) that reads the KV cache in place.
//! - [`engine`]: the actor that owns the model; continuous batching with a
//!   KV memory budget, streaming, cancellation, KV reuse per session and
//!   across sessions (`engine::kv_pool`: prefill chunks end where the first
//!   message ends, so a new session borrows the system prompt and tools
//!   exactly), constrained decoding.
//! - [`tools`]: mini-program manifests (`tools/*.json`) and their flows
//!   (`tools::flow`, checked at load), argument validation, the tolerant
//!   tool-call parser and the llguidance grammar.
//! - [`agent`]: per-session state (the conversation, the input being
//!   handled, the gate), the flow executor (`agent/flows.rs`), the generic
//!   tool-calling loop for apps without flows (routing), the confirmation
//!   gate, cards.
//! - [`dialogue`]: the dialogue manager's parts: the flow stack, the
//!   command prompt and grammar, reading slot values from the person's
//!   words (`value`, on `ground`: what the words and tool results
//!   establish), the executor's reply templates, and the `Generator` seam
//!   (the engine, or a scripted generator in unit tests).
//! - [`adapter`]: how a validated call reaches a mini-program (HTTP/JSON).
//! - [`guard`]: what every listener checks first: the `Host` (DNS
//!   rebinding), a browser's `Origin`, JSON bodies.
//! - [`audit`]: the append-only audit log.
//! - [`memory`]: memories per user, "my usual", the Now feed, embeddings and
//!   the vector stores (`docs/memory.md`); `errand bench-memory`.
//! - [`sandbox`]: the sandbox mini-programs and the payment service.
//! - [`chat`]: the terminal REPL behind `errand chat`.
//! - [`server`]: `errand serve`: the WebSocket protocol (`docs/protocol.md`),
//!   the OpenAI-compatible API, REST, auth, limits, metrics and the web page.
//! - [`eval`]: `errand eval`, scripted and simulated dialogues over the
//!   WebSocket protocol, judged on calls, words and end state (`docs/eval.md`).
//! - [`bench`]: `errand bench`, speed against llama.cpp's `llama-bench`,
//!   aggregate throughput at 1/4/16 sessions, callgrind instruction counts.
//! - [`toolcheck`]: `errand toolcheck`, tool-call validity with and without constraints.
//! - [`world`]: what the assistant and the mini-programs share: the
//!   [`Clock`](world::Clock) every part of one world reads (the wall clock,
//!   or pinned by `--now`/`ERRAND_NOW`, tests and evaluations; the only
//!   read of the machine's date, which tests deny), calendar arithmetic,
//!   cities and places in three languages, and money formatting.
//!   `scripts/modgraph.py` prints the modules' graph and fails on a cycle.
//!
//! The library never prints; `src/main.rs` parses arguments and calls in.

pub mod adapter;
pub mod agent;
pub mod dialogue;
pub mod audit;
pub mod bench;
pub mod catalog;
pub mod chat;
pub mod engine;
pub mod eval;
pub mod gguf;
pub mod guard;
pub mod memory;
pub mod model;
pub mod prompt;
pub mod sandbox;
pub mod server;
pub mod template;
pub mod tokenizer;
pub mod toolcheck;
pub mod tools;
pub mod world;

/// The source tree this build came from, for files tests and developer
/// commands read (`tools/`, `prompts/`, `scripts/`). Cargo sets
/// `CARGO_MANIFEST_DIR` when it runs tests, and that wins over the path
/// compiled in: a target directory shared between clones can hand one clone
/// a test binary built in another, whose compiled-in path may be gone.
pub fn source_root() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
