//! # Errand
//!
//! A local-first conversational life assistant. Everything runs in this
//! process: the LLM on candle (CPU by default), tool calling against
//! mini-program services, and, in later layers, payments, memory and the
//! server.
//!
//! ## Architecture map
//!
//! ```text
//!  models/catalog.toml ──► catalog ──► ResolvedModel (a GGUF on disk; models/fetch.py fetches)
//!                                          │
//!                                          ▼
//!                          gguf ── GgufFile (header, metadata, lazily read tensors)
//!                         ╱   │   ╲
//!                tokenizer  template  model ── Transformer (qwen2, llama) + KvCache
//!         (llama.cpp-exact)  (model's own      (caller-owned cache per session)
//!                   │        Jinja template)        │
//!                   └──► prompt ◄── prompts/        │
//!                        (system prompt, tools,     │
//!                         injection-safe tokens)    │
//!                                 │                 │
//!                                 ▼                 ▼
//!   chat REPL / bench ──Request──► engine (one OS thread, bounded queue)
//!         ▲                          ├─ kv_pool: per-session caches, LRU under a byte budget
//!         │                          ├─ sampler: seeded greedy/temperature/top-k/top-p/penalty
//!         │                          ├─ detok: UTF-8-safe incremental text, stop strings
//!         │                          └─ tools::grammar: llguidance mask from tool schemas
//!         └──────── Event stream ◄── tools::parse: tolerant tool-call extraction
//!                   (Delta, ToolCall, ToolCallMalformed, Done{usage}, Error)
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
//! - [`model`]: the transformer forward pass with an external KV cache.
//! - [`engine`]: the actor that owns the model; streaming, cancellation,
//!   KV reuse per session, constrained decoding.
//! - [`tools`]: mini-program manifests (`tools/*.json`), argument validation,
//!   the tolerant tool-call parser and the llguidance grammar.
//! - [`chat`]: the terminal REPL behind `errand chat`.
//! - [`bench`]: `errand bench`, speed against llama.cpp's `llama-bench`.
//! - [`toolcheck`]: `errand toolcheck`, tool-call validity with and without constraints.
//!
//! The library never prints; `src/main.rs` parses arguments and calls in.

pub mod adapter;
pub mod agent;
pub mod audit;
pub mod bench;
pub mod catalog;
pub mod chat;
pub mod engine;
pub mod gguf;
pub mod model;
pub mod prompt;
pub mod sandbox;
pub mod template;
pub mod tokenizer;
pub mod toolcheck;
pub mod tools;
