//! Shared helpers: models, engines loaded once per test binary, fixtures,
//! and the pinned clock every world in these tests runs on.

use errand::catalog::{self, ResolvedModel};
use errand::engine::{Engine, EngineOptions};
use errand::world::clock::{self, Clock};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

pub const QWEN: &str = "qwen2.5-coder-0.5b-instruct";
pub const SMOL: &str = "smollm2-135m-instruct";

pub fn repo() -> PathBuf {
    errand::source_root()
}

pub fn model(name: &str) -> ResolvedModel {
    catalog::resolve(name).unwrap_or_else(|e| panic!("{e}"))
}

/// The instant every test world starts at: a Tuesday, noon in Shanghai
/// (04:00 UTC, the same date in both), when the restaurants are open.
/// Results must not depend on the day the tests run (issue 21: a train
/// test passed one day and failed the next).
pub const NOW: &str = "2026-12-08T12:00:00+08:00";

/// The tests' instant: [`NOW`], or `ERRAND_TEST_NOW` to try the same
/// tests at another instant on purpose (never the machine's date).
pub fn now_ms() -> i64 {
    let s = std::env::var("ERRAND_TEST_NOW").unwrap_or_else(|_| NOW.to_owned());
    clock::parse_instant(&s).unwrap_or_else(|e| panic!("ERRAND_TEST_NOW: {e}"))
}

/// A fresh clock pinned at [`now_ms`]. From the first call on, reading the
/// machine's clock anywhere in the library panics in this test binary.
pub fn clock() -> Clock {
    clock::deny_wall_clock();
    Clock::pinned(now_ms())
}

fn start(name: &str) -> Engine {
    // Anything that runs a model must not see the machine's date.
    clock::deny_wall_clock();
    Engine::start(&model(name), EngineOptions::default())
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

/// One SmolLM2 engine shared by the tests in this binary.
pub fn smol() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| start(SMOL))
}

/// A SmolLM2 engine of its own, for tests that load the engine on purpose
/// (the campaigns): their requests neither slow down nor show up in the
/// counters of the tests sharing [`smol`].
pub fn own_smol() -> std::sync::Arc<Engine> {
    std::sync::Arc::new(start(SMOL))
}

/// One Qwen engine shared by the tests in this binary.
pub fn qwen() -> &'static Engine {
    qwen_static()
}

fn qwen_static() -> &'static Arc<Engine> {
    static E: OnceLock<Arc<Engine>> = OnceLock::new();
    E.get_or_init(|| Arc::new(start(QWEN)))
}

/// The same engine, for owners that need an `Arc` (the agent).
pub fn qwen_arc() -> Arc<Engine> {
    qwen_static().clone()
}

/// Pretty-prints what a failing comparison saw, ripgrep-style.
pub fn show(label: &str, value: &impl std::fmt::Debug) -> String {
    format!("\n--- {label} ---\n{value:#?}\n")
}

/// One MiniLM embedder shared by the tests in this binary.
pub fn minilm() -> std::sync::Arc<dyn errand::memory::embed::Embedder> {
    static E: OnceLock<Arc<errand::memory::embed::MiniLm>> = OnceLock::new();
    E.get_or_init(|| Arc::new(errand::memory::embed::MiniLm::from_catalog().unwrap_or_else(|e| panic!("{e:#}")))).clone()
}
