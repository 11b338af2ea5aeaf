//! Shared helpers: models, engines loaded once per test binary, fixtures.

use errand::catalog::{self, ResolvedModel};
use errand::engine::{Engine, EngineOptions};
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

fn start(name: &str) -> Engine {
    Engine::start(&model(name), EngineOptions::default())
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

/// One SmolLM2 engine shared by the tests in this binary.
pub fn smol() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| start(SMOL))
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
