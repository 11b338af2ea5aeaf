//! `errand eval`: scripted and simulated dialogues over the WebSocket
//! protocol, judged on tool calls, confirmations, words and the final state
//! of the mini-programs (`docs/eval.md`).
//!
//! - [`dialogue`]: the YAML format, checked and compiled before anything runs.
//! - [`matcher`]: exact, normalised, any-of, regex, range, absent … matchers.
//! - [`client`]: one input over the WebSocket, recorded as the user saw it.
//! - [`run`]: a fresh world per run (an in-process server and seeded
//!   sandbox on the shared engine, or a remote server), the turns, the state.
//! - [`sim`]: simulated users: the local model plays the person.
//! - [`score`]: the judgement and its reason codes, including the invariant
//!   "no payment or booking without confirmation".
//! - [`report`]: pass^k, tables by domain and language, latency, tokens;
//!   [`render`]: the terminal table and the self-contained HTML page.

pub mod client;
pub mod dialogue;
pub mod matcher;
pub mod render;
pub mod report;
pub mod run;
pub mod score;
pub mod sim;
