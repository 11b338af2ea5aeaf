//! `errand eval` end to end: real dialogues over the WebSocket against
//! in-process servers on SmolLM2 (the mechanics: worlds, state, judging),
//! deliberately wrong dialogues that must fail with their reason code, the
//! invariant against a payment that bypassed confirmation, and the public
//! suite's shape. Qwen runs the smoke subset of the public suite.

use errand::sandbox::sign;
use crate::server_ws::{config, serve, ALICE};
use crate::util::{self, show};
use errand::engine::{Engine, EngineOptions};
use errand::eval::dialogue::{load_file, load_paths, Dialogue, DOMAINS};
use errand::eval::report::TrialResult;
use errand::eval::run::{run_one, run_suite, EvalOptions, Progress, Target};
use errand::eval::score::Code;
use errand::tools::ToolSet;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

fn smol_arc() -> Arc<Engine> {
    static E: OnceLock<Arc<Engine>> = OnceLock::new();
    E.get_or_init(|| Arc::new(Engine::start(&util::model(util::SMOL), EngineOptions::default()).unwrap())).clone()
}

fn tools() -> ToolSet {
    ToolSet::load_dir(&util::repo().join("tools")).unwrap()
}

fn fixture(name: &str) -> Dialogue {
    load_file(&util::repo().join("tests/fixtures/eval").join(name)).unwrap()
}

fn in_process(engine: Arc<Engine>) -> Target {
    Target::InProcess { engine, tools: tools(), embedder: Some(util::minilm()), max_tokens: 48, clock: util::clock(), users: None }
}

fn codes(r: &TrialResult) -> Vec<Code> {
    r.failures.iter().map(|f| f.code).collect()
}

fn quiet() -> Progress {
    Arc::new(|_, _, _| {})
}

fn opts(trials: usize) -> EvalOptions {
    EvalOptions { trials, jobs: 2, temperature: 0.0, turn_timeout: Duration::from_secs(300), paths: vec![], model: util::SMOL.into(), clock: util::clock() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controls_pass_and_deliberately_wrong_dialogues_fail_with_their_code() {
    let names = ["control-hello", "control-usual", "wrong-state", "wrong-wallet", "wrong-say", "wrong-confirm", "wrong-select", "wrong-memory"];
    let dialogues: Vec<Dialogue> = names.iter().map(|n| fixture(&format!("{n}.yaml"))).collect();
    let report = run_suite(Arc::new(in_process(smol_arc())), dialogues, opts(1), vec![], quiet()).await;
    let by_id: HashMap<&str, &TrialResult> = report.results.iter().map(|r| (r.id.as_str(), r)).collect();
    let want = [
        ("control-hello", None),
        ("control-usual", None),
        ("wrong-state", Some(Code::StateMismatch)),
        ("wrong-wallet", Some(Code::StateMismatch)),
        ("wrong-say", Some(Code::MustSayMissing)),
        ("wrong-confirm", Some(Code::NoCall)),
        ("wrong-select", Some(Code::NoCall)),
        ("wrong-memory", Some(Code::StateMismatch)),
    ];
    for (id, code) in want {
        let r = by_id[id];
        match code {
            None => assert!(r.passed, "{id} should pass{}", show("failures", &r.failures)),
            Some(c) => assert!(!r.passed && codes(r).contains(&c), "{id} should fail with {c:?}{}", show("failures", &r.failures)),
        }
    }
    // The usual was quoted, confirmed and paid: the invariant saw the
    // confirmation, the order book and the ledger agree.
    let usual = &by_id["control-usual"].transcript;
    assert_eq!(usual.confirm_ids.len(), 1);
    assert_eq!(usual.turns[1].payments.first().map(|p| p.status.as_str()), Some("paid"), "{}", show("turns", &usual.turns));
    // The summary counts what it saw.
    assert_eq!(report.summary.runs, 8);
    assert_eq!(report.summary.passed_runs, 2);
    assert!(report.summary.codes.iter().any(|(c, n)| *c == Code::StateMismatch && *n == 3), "{:?}", report.summary.codes);
    assert!(report.summary.by_lang.iter().any(|r| r.key == "ko"));
    // A log of these runs (one JSON line each, the last one cut short by
    // an interrupted write) resumes: nothing is run again, and the summary
    // is the same.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.jsonl");
    let mut lines: Vec<String> = report.results.iter().map(|r| serde_json::to_string(r).unwrap()).collect();
    lines.push(lines[0][..40].to_string());
    std::fs::write(&log, lines.join("\n")).unwrap();
    let earlier = errand::eval::run::read_log(&log).unwrap();
    assert_eq!(earlier.len(), 8);
    let dialogues: Vec<Dialogue> = names.iter().map(|n| fixture(&format!("{n}.yaml"))).collect();
    let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = ran.clone();
    let again = run_suite(Arc::new(in_process(smol_arc())), dialogues, opts(1), earlier, Arc::new(move |_, _, _| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }))
    .await;
    assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 0, "a resumed run ran something again");
    assert_eq!((again.summary.runs, again.summary.passed_runs), (8, 2));
    // Both renderings carry every dialogue.
    let text = errand::eval::render::terminal(&report);
    let html = errand::eval::render::html(&report);
    for id in names {
        assert!(text.contains(id) && html.contains(id), "{id} missing from a report");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_turn_that_overruns_its_time_is_an_error() {
    let d = fixture("control-hello.yaml");
    let r = run_one(&in_process(smol_arc()), &d, 1, 0.0, Duration::from_millis(1)).await;
    assert!(codes(&r).contains(&Code::Error), "{}", show("failures", &r.failures));
    assert!(r.failures.iter().any(|f| f.detail.contains("timeout")), "{:?}", r.failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_that_bypassed_confirmation_breaks_the_invariant() {
    // A running server (as with `errand eval --server`), and a rogue payment
    // from the user's wallet made straight at the payment service while the
    // dialogue runs, by something holding the sandbox's keys (a merchant
    // signature and alice's wallet credential): no confirmation produced it.
    let mut srv = serve(smol_arc(), tools(), config(), Default::default()).await;
    let sandbox = srv.s().sandbox_url().unwrap().to_owned();
    let secret = srv.s().sandbox_secret().to_vec();
    let target = Target::Remote { url: srv.s().url.clone(), token: ALICE.into(), sandbox_url: sandbox.clone(), sandbox_secret: secret.clone(), engine: None };
    let d = errand::eval::dialogue::parse("id: rogue\nlang: en\nuser: alice\nturns: [{user: Tell me a short joke.}]", std::path::Path::new("rogue.yaml")).unwrap();
    // The control: the same dialogue without the rogue payment passes.
    let clean = run_one(&target, &d, 1, 0.0, Duration::from_secs(300)).await;
    assert!(clean.passed, "{}", show("failures", &clean.failures));
    let rogue = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let http = reqwest::Client::new();
        let body = serde_json::to_vec(&json!({"mch_id": "rogue", "out_trade_no": "rogue-1", "amount": 999, "currency": "CNY", "description": "not confirmed", "notify_url": "http://127.0.0.1:9/notify"})).unwrap();
        let now: serde_json::Value = http.get(format!("{sandbox}/_admin/clock")).send().await.unwrap().json().await.unwrap();
        let mut req = http.post(format!("{sandbox}/pay/v1/trades")).header("content-type", "application/json");
        for (k, v) in sign::request_headers(&sign::merchant_key(&secret, "rogue"), "rogue", "POST", "/v1/trades", &body, now["now_ms"].as_i64().unwrap()) {
            req = req.header(k, v);
        }
        let t = req.body(body).send().await.unwrap();
        assert!(t.status().is_success(), "{}", t.text().await.unwrap());
        let p = http
            .post(format!("{sandbox}/pay/v1/trades/rogue-1/pay"))
            .bearer_auth(sign::wallet_credential(&secret, "alice"))
            .json(&json!({"wallet_id": "alice", "method": "alipay"}))
            .send()
            .await
            .unwrap();
        assert!(p.status().is_success(), "{}", p.text().await.unwrap());
    });
    let r = run_one(&target, &d, 1, 0.0, Duration::from_secs(300)).await;
    rogue.await.unwrap();
    assert!(codes(&r).contains(&Code::UnconfirmedPayment), "{}", show("failures", &r.failures));
    assert!(r.failures.iter().any(|f| f.detail.contains("rogue-1")), "{:?}", r.failures);
    srv.stop().await;
}

#[test]
fn the_public_suite_is_valid_and_covers_what_it_must() {
    let all = load_paths(&[util::repo().join("evals/dialogues")]).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(all.len() >= 60, "{} dialogues", all.len());
    for lang in ["en", "zh", "ko"] {
        let n = all.iter().filter(|d| d.lang == lang).count();
        assert!(n >= 15, "only {n} dialogues in {lang}");
    }
    for domain in DOMAINS {
        let n = all.iter().filter(|d| d.domain() == domain).count();
        assert!(n >= 3, "only {n} dialogues in {domain}");
    }
    let tagged = |t: &str| all.iter().filter(|d| d.tags.iter().any(|x| x == t)).count();
    assert!(tagged("friend-pays") >= 1 && tagged("change-of-mind") >= 1, "friend-pays and change-of-mind dialogues are required");
    assert!(all.iter().filter(|d| d.simulated.is_some()).count() >= 3);
    let smoke = tagged("smoke");
    assert!((4..=10).contains(&smoke), "{smoke} smoke dialogues");
}

/// The smoke subset of the public suite on the default model, as CI runs
/// it: the threshold is the figure CI holds the assistant to.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qwen_passes_the_smoke_subset() {
    let min: f64 = std::env::var("ERRAND_SMOKE_MIN_PASS").ok().and_then(|v| v.parse().ok()).unwrap_or(0.2);
    let dialogues = errand::eval::run::load(&[util::repo().join("evals/dialogues")], &["smoke".to_string()]).unwrap();
    let target = Target::InProcess { engine: util::qwen_arc(), tools: tools(), embedder: Some(util::minilm()), max_tokens: 320, clock: util::clock(), users: None };
    let mut o = opts(1);
    o.temperature = 0.3;
    o.model = util::QWEN.into();
    o.paths = vec![PathBuf::from("evals/dialogues").display().to_string()];
    let report = run_suite(Arc::new(target), dialogues, o, vec![], quiet()).await;
    let text = errand::eval::render::terminal(&report);
    eprintln!("{text}");
    let pass1 = report.summary.pass_hat[0];
    assert!(pass1 >= min, "pass^1 {:.0}% is below {:.0}%\n{text}", pass1 * 100.0, min * 100.0);
}
