//! The `errand` command line: parses arguments and calls into the library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use errand::catalog::{self, Catalog};
use errand::chat::{self, ChatOptions};
use errand::engine::sampler::SamplingParams;
use errand::engine::{Engine, EngineOptions};
use errand::model::LoadOptions;
use errand::prompt::{Lang, Prompts};
use errand::adapter::{HttpAdapter, HttpOptions};
use errand::agent::{Agent, AgentOptions};
use errand::audit::Audit;
use errand::sandbox::{SandboxConfig, Service};
use errand::tools::ToolSet;
use errand::world::Clock;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "errand", version, about = "A local-first life assistant")]
struct Cli {
    /// Worker threads for inference (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Pin the world's clock (the assistant's "today", the mini-programs'
    /// opening hours and dates) to start at this instant, e.g.
    /// 2026-12-08T12:00+08:00; the machine's clock when unset.
    #[arg(long, global = true, env = "ERRAND_NOW", value_name = "INSTANT")]
    now: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// Catalog name, path to a .gguf, or hf:OWNER/REPO/FILE.gguf.
    #[arg(long, short)]
    model: Option<String>,
    /// Keep Q5_1/Q4_1 (and Q4_K/Q6_K) weights as they are instead of re-quantizing them to Q8_0.
    #[arg(long)]
    no_requant: bool,
    /// Multiply Q5_0/Q8_0 weights with candle's kernels instead of Errand's own (for comparisons).
    #[arg(long)]
    no_native: bool,
    /// Read prompt files from this folder instead of the built-in copies of prompts/.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Chat template file overriding the GGUF's own.
    #[arg(long)]
    template: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the assistant: chat page, WebSocket /v1/ws, OpenAI-compatible /v1, REST, /metrics.
    Serve {
        #[command(flatten)]
        model: ModelArgs,
        /// Address to listen on (default: the config's, 127.0.0.1:8080).
        #[arg(long)]
        addr: Option<std::net::SocketAddr>,
        /// Users, app keys and limits (default $ERRAND_HOME/server.toml, created on first start).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Folder of mini-program manifests.
        #[arg(long, default_value = "tools")]
        tools: PathBuf,
        /// Use mini-programs at this URL instead of starting the sandbox in-process.
        #[arg(long)]
        sandbox_url: Option<String>,
        /// Where the server keeps orders, the audit log and registered apps (default $ERRAND_HOME/server).
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long, default_value_t = 320)]
        max_tokens: usize,
        /// Keep memories and the catalog index on this Qdrant server (gRPC,
        /// e.g. http://localhost:6334) instead of the embedded qdrant-edge.
        #[arg(long)]
        qdrant_url: Option<String>,
        /// Run without memory and recommendations (no embedding model needed).
        #[arg(long, conflicts_with = "qdrant_url")]
        no_memory: bool,
    },
    /// Talk to the assistant in the terminal.
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        /// Folder of mini-program manifests whose tools the model may call.
        #[arg(long, default_value = "tools")]
        tools: PathBuf,
        /// Do not offer any tools.
        #[arg(long)]
        no_tools: bool,
        /// Let the model write tool calls freely instead of grammar-constrained.
        #[arg(long)]
        unconstrained: bool,
        /// Conversation language (en, zh, ko); detected from the first message if unset.
        #[arg(long)]
        lang: Option<String>,
        /// Sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 512)]
        max_tokens: usize,
        /// Ask one question, print the reply and exit.
        #[arg(long)]
        once: Option<String>,
        /// Print token counts and speed after each reply.
        #[arg(long)]
        stats: bool,
        /// Use mini-programs at this URL instead of starting the sandbox in-process.
        #[arg(long)]
        sandbox_url: Option<String>,
        /// Where the in-process sandbox keeps its databases (default $ERRAND_HOME/sandbox).
        #[arg(long)]
        sandbox_data: Option<PathBuf>,
        /// The wallet payments come from, and how (alipay or wechat).
        #[arg(long, default_value = "demo")]
        wallet: String,
        #[arg(long, default_value = "alipay")]
        pay_method: String,
    },
    /// Run the sandbox mini-programs alone (payments, tickets, food, ride, salon, bike, mart).
    Sandbox {
        #[arg(long, default_value_t = 8700)]
        port: u16,
        /// Database folder (default $ERRAND_HOME/sandbox).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Comma-separated services to run (default: all).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// A payment service elsewhere, when `pay` is not among --only.
        #[arg(long)]
        pay_url: Option<String>,
        /// Catalog seed: the same seed gives the same trains, restaurants and prices.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Fault injection: delay every request by this much.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Fault injection: answer this share of requests (0..1) with 503.
        #[arg(long, default_value_t = 0.0)]
        error_rate: f64,
        /// Shared merchant/payment secret (default: DATA/secret, created on first start).
        #[arg(long)]
        secret: Option<String>,
        /// Test knob: exit right after a payment commits, before notifying the merchant.
        #[arg(long, hide = true)]
        crash_after_pay: bool,
        /// First retry delay for payment notifications, in milliseconds.
        #[arg(long, default_value_t = 500)]
        notify_backoff_ms: u64,
    },
    /// Measure speed against llama.cpp's llama-bench on the same file.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        gen_tokens: usize,
        /// Tokens already in context before timing (llama-bench -d).
        #[arg(long, default_value_t = 0)]
        depth: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Folder with llama-bench (default: built by scripts/llama-cpp.sh).
        #[arg(long)]
        llama_bin: Option<PathBuf>,
        /// Skip the llama.cpp anchor.
        #[arg(long)]
        no_anchor: bool,
        #[arg(long, default_value = "tools")]
        tools: PathBuf,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Session counts for aggregate throughput (comma-separated; 0 skips).
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        concurrency: Vec<usize>,
        /// Tokens each concurrent session generates (as many as tg128 by default).
        #[arg(long, default_value_t = 128)]
        concurrent_tokens: usize,
        /// Also count the instructions of this many decode steps with
        /// valgrind's callgrind (one thread; 0 skips).
        #[arg(long, default_value_t = 0)]
        instructions: usize,
    },
    /// A fixed decode for `bench --instructions` (run under callgrind).
    #[command(hide = true)]
    BenchDecode {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value_t = 8)]
        steps: usize,
        /// Time batched steps of this many sequences instead (ms per step).
        #[arg(long)]
        batch: Option<usize>,
        /// Tokens each batched sequence already holds.
        #[arg(long, default_value_t = 64)]
        context: usize,
    },
    /// Feed latency at catalog scale and memory-write throughput, against anchors.
    BenchMemory {
        /// Catalog size (the real items, copied with jitter up to this many).
        #[arg(long, default_value_t = 100_000)]
        items: usize,
        #[arg(long, default_value_t = 1000)]
        queries: usize,
        #[arg(long, default_value_t = 200)]
        writes: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// How often tool calls are valid, with and without constraints (evals/toolcalls.json).
    Toolcheck {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value = "evals/toolcalls.json")]
        cases: PathBuf,
        #[arg(long, default_value = "tools")]
        tools: PathBuf,
    },
    /// Run scripted (and simulated-user) dialogues over the WebSocket protocol and score them (docs/eval.md).
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        /// Dialogue files or folders (*.yaml, *.yml, folders recursively).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Runs per dialogue; pass^1 … pass^k are reported.
        #[arg(long, default_value_t = 1)]
        trials: usize,
        /// Runs at once (they share one engine).
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Only dialogues with this id or tag (repeatable).
        #[arg(long)]
        only: Vec<String>,
        /// A running `errand serve` (http://HOST:PORT) instead of a fresh in-process server per run.
        #[arg(long)]
        server: Option<String>,
        /// The user's bearer token on --server.
        #[arg(long, requires = "server")]
        token: Option<String>,
        /// The mini-programs' base URL behind --server (for wallets, friend-pay, the catalog).
        #[arg(long, requires = "server")]
        sandbox: Option<String>,
        /// Assistant sampling temperature; each run has its own fixed seed (0: greedy, every trial the same).
        #[arg(long, default_value_t = 0.3)]
        temperature: f32,
        /// Seconds a turn may take before it counts as an error.
        #[arg(long, default_value_t = 600)]
        turn_timeout: u64,
        /// Reply budget per model round (in-process).
        #[arg(long, default_value_t = 320)]
        max_tokens: usize,
        #[arg(long, default_value = "tools")]
        tools: PathBuf,
        /// Write the full results (every turn of every run) as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write a self-contained HTML report here.
        #[arg(long)]
        html: Option<PathBuf>,
        /// Append each finished run to this file (JSON lines); runs already in it are not run
        /// again, so an interrupted run resumes and more trials can be added later.
        #[arg(long)]
        log: Option<PathBuf>,
        /// Exit with status 3 when pass^1 is below this (0-1, or a percentage like 60%).
        #[arg(long)]
        min_pass: Option<String>,
        /// Check the files and list the dialogues; run nothing.
        #[arg(long)]
        check: bool,
        /// The model that plays simulated users (catalog name or path); the assistant's own when unset.
        #[arg(long)]
        user_model: Option<String>,
    },
    /// Show the model catalog and what is downloaded.
    Models,
    /// Print token ids for a text (as llama-tokenize would).
    Tokenize {
        #[command(flatten)]
        model: ModelArgs,
        text: String,
        /// Treat control-token text as plain text.
        #[arg(long)]
        no_parse_special: bool,
    },
}

fn resolve(m: &ModelArgs) -> Result<catalog::ResolvedModel> {
    let spec = match &m.model {
        Some(s) => s.clone(),
        None => Catalog::builtin()?.default_chat,
    };
    Ok(catalog::resolve(&spec)?)
}

fn engine_options(m: &ModelArgs) -> Result<EngineOptions> {
    let prompts = match &m.prompts {
        Some(dir) => Prompts::from_dir(dir)?,
        None => Prompts::builtin(),
    };
    let template_override = match &m.template {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("cannot read template {}", p.display()))?),
        None => None,
    };
    Ok(EngineOptions {
        load: LoadOptions {
            native_kernels: !m.no_native,
            requantize_to_q8_0: !m.no_requant,
        },
        prompts,
        template_override,
        ..Default::default()
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    // candle and gemm size their pools from this before first use.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let clock = Clock::from_option(cli.now.as_deref()).context("--now (or ERRAND_NOW)")?;
    match cli.cmd {
        Cmd::Serve { model, addr, config, tools, sandbox_url, data, max_tokens, qdrant_url, no_memory } => {
            let memory = (!no_memory).then_some(qdrant_url);
            serve(model, addr, config, tools, sandbox_url, data, max_tokens, memory, clock)?
        }
        Cmd::Sandbox { port, data, only, pay_url, seed, latency_ms, error_rate, secret, crash_after_pay, notify_backoff_ms } => {
            let mut cfg = SandboxConfig::new(data.unwrap_or_else(sandbox_dir), clock);
            cfg.addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            cfg.seed = seed;
            if !only.is_empty() {
                cfg.services = only
                    .iter()
                    .map(|s| Service::parse(s.trim()).with_context(|| format!("unknown service `{s}`; the services are pay, tickets, food, ride, salon, bike, mart")))
                    .collect::<Result<_>>()?;
            }
            anyhow::ensure!(
                cfg.services.contains(&Service::Pay) || pay_url.is_some(),
                "without `pay` in --only, give --pay-url of a running payment service"
            );
            anyhow::ensure!((0.0..=1.0).contains(&error_rate), "--error-rate must be between 0 and 1");
            cfg.pay_url = pay_url;
            cfg.secret = secret.map(String::into_bytes);
            cfg.faults = errand::sandbox::core::FaultConfig { latency_ms, error_rate };
            cfg.pay.crash_after_pay = crash_after_pay;
            cfg.pay.notify_backoff = std::time::Duration::from_millis(notify_backoff_ms);
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let names: Vec<&str> = cfg.services.iter().map(|s| s.name()).collect();
                let data = cfg.data_dir.clone();
                let sb = errand::sandbox::start(cfg.clone()).await?;
                println!("sandbox listening on {} ({}); data in {}", sb.base_url, names.join(", "), data.display());
                tokio::signal::ctrl_c().await?;
                sb.stop().await;
                anyhow::Ok(())
            })?;
        }
        Cmd::Chat { model, tools, no_tools, unconstrained, lang, temperature, seed, max_tokens, once, stats, sandbox_url, sandbox_data, wallet, pay_method } => {
            let lang = match lang.as_deref() {
                None => None,
                Some(l) => Some(Lang::parse(l).with_context(|| format!("unknown language `{l}`; use en, zh or ko"))?),
            };
            let tools = if no_tools {
                None
            } else {
                Some(Arc::new(ToolSet::load_dir(&tools)?))
            };
            let resolved = resolve(&model)?;
            eprintln!("loading {} …", resolved.path.display());
            let engine = Engine::start(&resolved, engine_options(&model)?)?;
            eprintln!(
                "{} ({}, context {}) ready in {:.1} s. {}",
                engine.info.name,
                engine.info.arch,
                engine.info.context_length,
                engine.info.load_ms / 1000.0,
                if no_tools { chat::HELP } else { chat::AGENT_HELP }
            );
            let mut sampling = if temperature > 0.0 { SamplingParams::chat(seed) } else { SamplingParams::greedy() };
            sampling.temperature = temperature;
            let opts = ChatOptions {
                lang,
                tools,
                constrain: !unconstrained,
                sampling,
                max_tokens,
                stats,
                clock: clock.clone(),
                ..Default::default()
            };
            let mut out = std::io::stdout();
            if let Some(tools) = opts.tools.clone() {
                let rt = tokio::runtime::Runtime::new()?;
                let (base, _sandbox, secret) = match sandbox_url {
                    Some(u) => (u.trim_end_matches('/').to_owned(), None, remote_sandbox_secret()?),
                    None => {
                        let sb = rt.block_on(errand::sandbox::start(SandboxConfig::new(sandbox_data.unwrap_or_else(sandbox_dir), clock.clone())))?;
                        eprintln!("sandbox mini-programs at {}", sb.base_url);
                        let secret = sb.secret().to_vec();
                        (sb.base_url.clone(), Some(sb), secret)
                    }
                };
                let credentials = errand::agent::PayCredentials(errand::sandbox::sign::wallet_credentials(&secret));
                let adapter = Arc::new(HttpAdapter::new(HttpOptions { sandbox_url: Some(base.clone()), ..Default::default() }));
                let audit = Audit::open(&errand_home().join("audit.db"), clock.clone())?;
                let agent = Agent::new(
                    Arc::new(engine),
                    tools,
                    adapter,
                    audit,
                    AgentOptions {
                        max_tokens,
                        sampling: opts.sampling,
                        constrain: opts.constrain,
                        pay_url: Some(format!("{base}/pay")),
                        wallet,
                        pay_method,
                        pay_credentials: Some(credentials),
                        lang: opts.lang,
                        clock: clock.clone(),
                        ..Default::default()
                    },
                );
                let session = format!("cli-{}", std::process::id());
                let stdin = std::io::stdin();
                match once {
                    Some(q) => chat::agent_repl(rt.handle(), &agent, &session, std::io::Cursor::new(q), &mut out, false)?,
                    None => {
                        let interactive = stdin.is_terminal();
                        chat::agent_repl(rt.handle(), &agent, &session, stdin.lock(), &mut out, interactive)?;
                    }
                }
                return Ok(());
            }
            match once {
                Some(q) => {
                    let mut conv = chat::Conversation { messages: Vec::new(), lang: opts.lang };
                    chat::turn(&engine, &opts, &mut conv, &q, &mut out)?;
                    println!();
                }
                None => {
                    let stdin = std::io::stdin();
                    let interactive = stdin.is_terminal();
                    chat::repl(&engine, opts, stdin.lock(), &mut out, interactive)?;
                }
            }
        }
        Cmd::Bench {
            model,
            prompt_tokens,
            gen_tokens,
            depth,
            reps,
            llama_bin,
            no_anchor,
            tools,
            json,
            concurrency,
            concurrent_tokens,
            instructions,
        } => {
            let resolved = resolve(&model)?;
            let llama_bin = if no_anchor {
                None
            } else {
                Some(match llama_bin {
                    Some(d) => d,
                    None => build_llama_cpp()?,
                })
            };
            let load = engine_options(&model)?.load;
            let opts = errand::bench::BenchOptions {
                model: resolved.clone(),
                threads,
                prompt_tokens,
                gen_tokens,
                depth,
                reps,
                load,
                llama_bin,
                tools_dir: tools,
                concurrency: concurrency.into_iter().filter(|&n| n > 0).collect(),
                concurrent_tokens,
            };
            let report = errand::bench::run(&opts)?;
            println!("{report}");
            let mut value = serde_json::to_value(&report)?;
            if instructions > 0 {
                let exe = std::env::current_exe()?;
                let mut flags = Vec::new();
                if !load.native_kernels {
                    flags.push("--no-native");
                }
                if !load.requantize_to_q8_0 {
                    flags.push("--no-requant");
                }
                let n = errand::bench::instructions(&exe, &resolved.path, &flags, instructions)?;
                println!(
                    "instructions (callgrind, 1 thread): {n} for {instructions} decode steps, {:.0} M per token",
                    n as f64 / instructions as f64 / 1e6
                );
                value["decode_instructions"] = serde_json::json!({ "steps": instructions, "total": n });
            }
            if let Some(p) = json {
                std::fs::write(&p, serde_json::to_string_pretty(&value)?)?;
            }
        }
        Cmd::BenchDecode { model, steps, batch: Some(b), context } => {
            let resolved = resolve(&model)?;
            let ms = errand::bench::batch_step_ms(&resolved.path, engine_options(&model)?.load, b, context, steps)?;
            println!("batch {b}, context {context}: {ms:.1} ms per step, {:.1} tok/s", b as f64 * 1000.0 / ms);
        }
        Cmd::BenchDecode { model, steps, batch: None, .. } => {
            let resolved = resolve(&model)?;
            let last = errand::bench::fixed_decode(&resolved.path, engine_options(&model)?.load, steps)?;
            println!("{last}");
        }
        Cmd::BenchMemory { items, queries, writes, json } => {
            let e: Arc<dyn errand::memory::embed::Embedder> = Arc::new(errand::memory::embed::MiniLm::from_catalog()?);
            let rt = tokio::runtime::Runtime::new()?;
            let report = rt.block_on(errand::memory::bench::run(e, items, queries, writes))?;
            println!("{report}");
            if let Some(p) = json {
                std::fs::write(&p, serde_json::to_string_pretty(&report)?)?;
            }
        }
        Cmd::Toolcheck { model, cases, tools } => {
            let text = std::fs::read_to_string(&cases).with_context(|| format!("cannot read {}", cases.display()))?;
            let cases: Vec<errand::toolcheck::Case> =
                serde_json::from_str(&text).with_context(|| format!("{} is not a valid case list", cases.display()))?;
            let tools = Arc::new(ToolSet::load_dir(&tools)?);
            let resolved = resolve(&model)?;
            let engine = Engine::start(&resolved, engine_options(&model)?)?;
            eprintln!("{} prompts, each with and without constraints …", cases.len());
            println!("{}", errand::toolcheck::run(&engine, tools, &cases, &clock)?);
        }
        Cmd::Eval { model, paths, trials, jobs, only, server, token, sandbox, temperature, turn_timeout, max_tokens, tools, json, html, log, min_pass, check, user_model } => {
            let min_pass = min_pass.as_deref().map(parse_fraction).transpose()?;
            anyhow::ensure!((1..=20).contains(&trials), "--trials must be 1 to 20");
            anyhow::ensure!((0.0..=2.0).contains(&temperature), "--temperature must be 0 to 2");
            let dialogues = errand::eval::run::load(&paths, &only)?;
            if check {
                for d in &dialogues {
                    println!("{:<40} {}  {:<10} {}", d.id, d.lang, d.domain(), if d.simulated.is_some() { "simulated".to_string() } else { format!("{} turns", d.turns.len()) });
                }
                println!("{} dialogues, all valid", dialogues.len());
                return Ok(());
            }
            let outputs = EvalOutputs { json, html, log, min_pass, user_model };
            let code = eval(model, paths, dialogues, trials, jobs, server, token, sandbox, temperature, turn_timeout, max_tokens, tools, outputs, clock)?;
            if code != 0 {
                std::process::exit(code);
            }
        }
        Cmd::Models => {
            let c = Catalog::builtin()?;
            let dir = catalog::models_dir();
            println!("model cache: {}", dir.display());
            for m in &c.models {
                let present = catalog::resolve(&m.name).is_ok();
                println!(
                    "{:<30} {:<10} {:<8} {}",
                    m.name,
                    m.role,
                    if present { "present" } else { "missing" },
                    m.description
                );
            }
            println!("fetch with: python3 models/fetch.py [NAME]");
        }
        Cmd::Tokenize { model, text, no_parse_special } => {
            let resolved = resolve(&model)?;
            let g = errand::gguf::GgufFile::open(&resolved.path)?;
            let tok = errand::tokenizer::Tokenizer::from_gguf(&g)?;
            let ids = tok.encode(&text, !no_parse_special)?;
            println!("{ids:?}");
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn serve(
    model: ModelArgs,
    addr: Option<std::net::SocketAddr>,
    config: Option<PathBuf>,
    tools: PathBuf,
    sandbox_url: Option<String>,
    data: Option<PathBuf>,
    max_tokens: usize,
    // None: no memory; Some(None): embedded qdrant-edge; Some(Some(url)): a Qdrant server.
    memory: Option<Option<String>>,
    clock: Clock,
) -> Result<()> {
    use errand::server::config::ServerConfig;
    use errand::server::{SandboxChoice, ServeOptions, Server};
    let config_path = config.unwrap_or_else(|| errand_home().join("server.toml"));
    let (mut cfg, created) = ServerConfig::load_or_create(&config_path)?;
    if created {
        eprintln!("wrote {} with a new user `me` and a random token", config_path.display());
    }
    if let Some(a) = addr {
        cfg.server.addr = a;
    }
    let tools = ToolSet::load_dir(&tools)?;
    let resolved = resolve(&model)?;
    eprintln!("loading {} …", resolved.path.display());
    let engine = Engine::start(&resolved, engine_options(&model)?)?;
    eprintln!("{} ready in {:.1} s", engine.info.name, engine.info.load_ms / 1000.0);
    let data = data.unwrap_or_else(|| errand_home().join("server"));
    let memory = match memory {
        None => None,
        Some(qdrant_url) => {
            let e = errand::memory::embed::MiniLm::from_catalog().context("memory needs the embedding model (or start with --no-memory)")?;
            Some(errand::server::MemoryOptions { embedder: Arc::new(e), qdrant_url })
        }
    };
    let sandbox = match sandbox_url {
        Some(url) => SandboxChoice::Remote { url, secret: remote_sandbox_secret()? },
        None => SandboxChoice::InProcess(SandboxConfig::new(sandbox_dir(), clock.clone())),
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.server.addr)
            .await
            .with_context(|| format!("cannot listen on {}; is another server running there? pick another with --addr", cfg.server.addr))?;
        let first_user = cfg.users.first().map(|u| u.token.clone());
        let opts = ServeOptions {
            config: cfg,
            data_dir: data,
            tools,
            agent: AgentOptions { max_tokens, extract_memories: memory.is_some(), ..Default::default() },
            sandbox,
            order_poll: std::time::Duration::from_secs(2),
            memory,
            clock,
        };
        let server = Server::start(Arc::new(engine), listener, opts).await?;
        if let Some(sb) = server.sandbox_url() {
            eprintln!("sandbox mini-programs at {sb}");
        }
        match first_user {
            Some(t) => println!("chat page: {}/#token={t}", server.url),
            None => println!("serving on {} (no users configured: add [[users]] to {})", server.url, config_path.display()),
        }
        println!("OpenAI-compatible API: {}/v1  ·  WebSocket: ws://{}/v1/ws  ·  metrics: {}/metrics", server.url, server.addr, server.url);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("shutting down: finishing replies in progress …");
        let clean = server.shutdown().await;
        eprintln!("{}", if clean { "stopped" } else { "stopped (some replies did not finish within the drain time)" });
        anyhow::Ok(())
    })
}

/// Where `errand eval` writes, and the bar it holds the result to.
struct EvalOutputs {
    json: Option<PathBuf>,
    html: Option<PathBuf>,
    log: Option<PathBuf>,
    min_pass: Option<f64>,
    /// Plays the simulated users when set.
    user_model: Option<String>,
}

/// `0.6` or `60%`.
fn parse_fraction(s: &str) -> Result<f64> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|x| x / 100.0),
        None => t.parse::<f64>(),
    }
    .with_context(|| format!("--min-pass takes a fraction (0.6) or a percentage (60%); got `{s}`"))?;
    anyhow::ensure!((0.0..=1.0).contains(&v), "--min-pass must be between 0 and 1 (or 0% and 100%); got `{s}`");
    Ok(v)
}

#[allow(clippy::too_many_arguments)]
fn eval(
    model: ModelArgs,
    paths: Vec<PathBuf>,
    dialogues: Vec<errand::eval::dialogue::Dialogue>,
    trials: usize,
    jobs: usize,
    server: Option<String>,
    token: Option<String>,
    sandbox: Option<String>,
    temperature: f32,
    turn_timeout: u64,
    max_tokens: usize,
    tools: PathBuf,
    out: EvalOutputs,
    // Dialogues without `now` run on forks of it; it stamps the report.
    clock: Clock,
) -> Result<i32> {
    use errand::eval::run::{read_log, run_suite, EvalOptions, Target};
    let EvalOutputs { json, html, log, min_pass, user_model } = out;
    // Fail on unwritable outputs now, not after an hour of dialogues.
    for p in json.iter().chain(html.iter()) {
        std::fs::write(p, b"").with_context(|| format!("cannot write {}", p.display()))?;
    }
    let earlier = match &log {
        Some(p) if p.exists() => read_log(p)?,
        _ => Vec::new(),
    };
    let log_file = match &log {
        Some(p) => Some(std::sync::Mutex::new(
            std::fs::OpenOptions::new().create(true).append(true).open(p).with_context(|| format!("cannot write the run log {}", p.display()))?,
        )),
        None => None,
    };
    let simulated = dialogues.iter().any(|d| d.simulated.is_some());
    // A separate model for the simulated users, so that a weak assistant
    // model is not also measured against a weak person.
    let users = match user_model.as_ref().filter(|_| simulated) {
        Some(name) => {
            let resolved = resolve(&ModelArgs { model: Some(name.clone()), ..model.clone() })?;
            eprintln!("loading {} for the simulated users …", resolved.path.display());
            Some(Arc::new(Engine::start(&resolved, engine_options(&model)?)?))
        }
        None => None,
    };
    let needs_engine = server.is_none() || (simulated && users.is_none());
    let (engine, mut model_name) = if needs_engine {
        let resolved = resolve(&model)?;
        eprintln!("loading {} …", resolved.path.display());
        let engine = Engine::start(&resolved, engine_options(&model)?)?;
        let name = engine.info.name.clone();
        (Some(Arc::new(engine)), name)
    } else {
        (None, "(the server's)".to_string())
    };
    if let Some(u) = &users {
        model_name = format!("{model_name}; simulated users: {}", u.info.name);
    }
    let target = match server {
        Some(url) => Target::Remote {
            url,
            token: token.context("--server needs --token (the user's bearer token)")?,
            sandbox_url: sandbox.context("--server needs --sandbox (the mini-programs' base URL, for wallets and state)")?,
            sandbox_secret: remote_sandbox_secret()?,
            engine: users.or(engine),
        },
        None => {
            let embedder: Option<Arc<dyn errand::memory::embed::Embedder>> = if dialogues.iter().any(|d| d.needs_memory()) {
                let e = errand::memory::embed::MiniLm::from_catalog().context("dialogues with memory need the embedding model")?;
                Some(Arc::new(e))
            } else {
                None
            };
            Target::InProcess { engine: engine.expect("loaded above"), tools: ToolSet::load_dir(&tools)?, embedder, max_tokens, clock: clock.clone(), users }
        }
    };
    let total = dialogues.len() * trials;
    eprintln!("{} dialogues × {trials} trial(s) = {total} runs, {jobs} at a time", dialogues.len());
    if !earlier.is_empty() {
        eprintln!("{} runs read from {}; they are not run again", earlier.len(), log.as_ref().map(|p| p.display().to_string()).unwrap_or_default());
    }
    let progress: errand::eval::run::Progress = Arc::new(move |n, total, r| {
        if let Some(f) = &log_file {
            use std::io::Write;
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            let line = serde_json::to_string(r).unwrap_or_default();
            if let Err(e) = writeln!(f, "{line}") {
                eprintln!("cannot append to the run log: {e}");
            }
        }
        let codes: Vec<&str> = r.failures.iter().map(|f| f.code.as_str()).collect();
        eprintln!(
            "[{n:>3}/{total}] {:<36} #{} {} {:>6.1} s{}",
            r.id,
            r.trial,
            if r.passed { "pass" } else { "FAIL" },
            r.wall_ms / 1000.0,
            if codes.is_empty() { String::new() } else { format!("  {}", codes.join(", ")) }
        );
    });
    let opts = EvalOptions {
        trials,
        jobs,
        temperature,
        turn_timeout: std::time::Duration::from_secs(turn_timeout),
        paths: paths.iter().map(|p| p.display().to_string()).collect(),
        model: model_name,
        clock,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(run_suite(Arc::new(target), dialogues, opts, earlier, progress));
    println!("{}", errand::eval::render::terminal(&report));
    if let Some(p) = &json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?).with_context(|| format!("cannot write {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &html {
        std::fs::write(p, errand::eval::render::html(&report)).with_context(|| format!("cannot write {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    let pass1 = report.summary.pass_hat.first().copied().unwrap_or(0.0);
    if let Some(min) = min_pass {
        if pass1 < min {
            eprintln!("pass^1 {:.1}% is below --min-pass {:.1}%", pass1 * 100.0, min * 100.0);
            return Ok(3);
        }
    }
    Ok(0)
}

fn errand_home() -> PathBuf {
    std::env::var_os("ERRAND_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/errand")))
        .unwrap_or_else(|| PathBuf::from(".errand"))
}

/// The secret of a sandbox started alone (`errand sandbox`), which a server,
/// a chat or an evaluation elsewhere needs for wallet and admin credentials:
/// `$ERRAND_SANDBOX_SECRET` (the sandbox's `--secret`), else the `secret`
/// file in the default sandbox data folder.
fn remote_sandbox_secret() -> Result<Vec<u8>> {
    if let Some(s) = std::env::var("ERRAND_SANDBOX_SECRET").ok().filter(|s| !s.is_empty()) {
        return Ok(s.into_bytes());
    }
    let path = sandbox_dir().join("secret");
    std::fs::read(&path).with_context(|| {
        format!(
            "a sandbox elsewhere needs its secret for wallet credentials: set ERRAND_SANDBOX_SECRET to its --secret, \
             or run it with its data in {} (where its `secret` file is)",
            sandbox_dir().display()
        )
    })
}

fn sandbox_dir() -> PathBuf {
    errand_home().join("sandbox")
}

/// Runs scripts/llama-cpp.sh (a cached build) and returns the folder with llama-bench.
fn build_llama_cpp() -> Result<PathBuf> {
    let script = errand::source_root().join("scripts/llama-cpp.sh");
    eprintln!("building (or finding) llama-bench with {} …", script.display());
    let out = std::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    anyhow::ensure!(out.status.success(), "{} failed; see its messages above", script.display());
    let dir = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").trim().to_owned();
    anyhow::ensure!(!dir.is_empty(), "{} printed no directory", script.display());
    Ok(PathBuf::from(dir))
}
