//! Stock clients against `errand serve` with the default model: the
//! official `openai` Python package (plain, streaming, a tool call, the
//! model list, a bad key, and `/metrics` through Prometheus' own parser),
//! and a real headless Chromium ordering food through the chat page.
//!
//! Each test installs what it needs first (`scripts/py-deps.sh`,
//! `scripts/browser-deps.sh`; both are quick when already done).

use crate::server_ws::{config, serve, ALICE};
use crate::util::{qwen_arc, repo};
use errand::agent::AgentOptions;
use errand::tools::ToolSet;
use std::process::Command;

/// Runs a setup script and returns the last line it printed.
fn setup(script: &str) -> String {
    let out = Command::new("bash").arg(repo().join(script)).output().unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_owned()
}

async fn run(mut cmd: tokio::process::Command) -> (bool, String, String) {
    let out = cmd.output().await.unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_openai_python_client_works_against_v1() {
    let python = setup("scripts/py-deps.sh");
    let mut t = serve(qwen_arc(), ToolSet::default(), config(), AgentOptions::default()).await;
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg(repo().join("tests/openai/test_client.py")).arg(&t.s().url).arg(ALICE).arg(&t.s().state.model_id);
    let (ok, out, err) = run(cmd).await;
    t.stop().await;
    assert!(ok, "the openai client test failed\n--- stdout ---\n{out}\n--- stderr ---\n{err}");
    for check in ["plain chat", "streaming", "tool call round trip", "models list", "wrong API key", "metrics"] {
        assert!(out.lines().any(|l| l.starts_with(&format!("PASS {check}:"))), "no passing `{check}` line:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn chromium_orders_food_through_the_chat_page_and_sees_it_paid() {
    let node_dir = setup("scripts/browser-deps.sh");
    let tools = ToolSet::load_dir(&repo().join("tools")).unwrap();
    let mut t = serve(qwen_arc(), tools, config(), AgentOptions::default()).await;
    // Screenshots go where the README's come from when asked, else to the test's folder.
    let shots = std::env::var_os("ERRAND_SCREENSHOTS").map(std::path::PathBuf::from).unwrap_or_else(|| t.dir.path().join("shots"));
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(repo().join("tests/browser/order_food.mjs"))
        .arg(format!("{}/#token={ALICE}", t.s().url))
        .arg(&shots)
        .env("ERRAND_NODE_DIR", &node_dir);
    let (ok, out, err) = run(cmd).await;
    let orders: serde_json::Value = reqwest::Client::new()
        .get(t.http("/v1/orders"))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    t.stop().await;
    // The page's timeline, shown with --nocapture (and by the harness on failure).
    eprintln!("{err}");
    assert!(ok, "the browser test failed\n--- stdout ---\n{out}\n--- stderr ---\n{err}");
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or("{}")).unwrap();
    assert_eq!(summary["ok"], true, "{out}");
    assert!(shots.join("chat-paid.png").exists());
    // The server's own record agrees with what the page showed.
    let rows = orders["orders"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{orders}");
    assert_eq!(rows[0]["payment_status"], "paid", "{orders}");
    // Delivered where the person asked, not to whatever a tapped card said.
    assert!(rows[0]["summary"].as_str().unwrap().contains("200 Renmin Road"), "{orders}");
}
