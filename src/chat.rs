//! `errand chat`: a terminal conversation with streaming replies.
//!
//! With mini-programs on (the default), every line goes through the
//! [`crate::agent::Agent`] ([`agent_repl`]): tool calls run against the
//! sandbox services, cards are listed with numbers to pick from, and a
//! confirmation is answered with yes / no (or a change in words). With
//! `--no-tools`, [`repl`] talks to the bare model.
//!
//! Context policy: the engine refuses prompts longer than the model's
//! context; the REPL then drops the oldest turns (never the system prompt)
//! and says so.
//!
//! Generic over input and output so tests can drive it.

use crate::engine::{Engine, EngineError, Event, Prompt, Request, Usage};
use crate::engine::sampler::SamplingParams;
use crate::prompt::Lang;
use crate::world::Clock;
use crate::template::{Message, TemplateFunction, TemplateToolCall};
use crate::tools::ToolSet;
use std::io::{BufRead, Write};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct ChatOptions {
    /// Fixed language; `None` detects it from the first user message.
    pub lang: Option<Lang>,
    pub tools: Option<Arc<ToolSet>>,
    pub constrain: bool,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub session: String,
    /// Print token counts and speed after each reply.
    pub stats: bool,
    /// "Today" in the system prompt (`--now` pins it).
    pub clock: Clock,
}

impl Default for ChatOptions {
    fn default() -> Self {
        Self {
            lang: None,
            tools: None,
            constrain: true,
            sampling: SamplingParams::greedy(),
            max_tokens: 512,
            session: "cli".into(),
            clock: Clock::wall(),
            stats: false,
        }
    }
}

/// One conversation's state.
pub struct Conversation {
    pub messages: Vec<Message>,
    pub lang: Option<Lang>,
}

/// What one user turn produced.
#[derive(Debug, Default)]
pub struct TurnResult {
    pub text: String,
    pub calls: Vec<(crate::tools::ToolCall, Option<String>)>,
    pub usage: Option<Usage>,
    pub dropped_turns: usize,
}

pub const AGENT_HELP: &str = "commands: /reset (new conversation), /quit; a number picks a card option; answer a confirmation with yes or no";

pub const HELP: &str = "commands: /reset (new conversation), /stats (toggle timings), /constrain on|off, /lang en|zh|ko, /quit";

/// Runs one user turn, streaming text to `out`.
pub fn turn<W: Write>(
    engine: &Engine,
    opts: &ChatOptions,
    conv: &mut Conversation,
    user: &str,
    out: &mut W,
) -> Result<TurnResult, EngineError> {
    let lang = *conv.lang.get_or_insert_with(|| opts.lang.unwrap_or_else(|| Lang::detect(user)));
    if conv.messages.is_empty() {
        conv.messages
            .push(Message::system(engine.info.prompt.prompts.system(lang, opts.clock.now_s())));
    }
    // Work on a copy: the conversation changes only when the turn succeeds.
    let mut messages = conv.messages.clone();
    messages.push(Message::user(user));
    let mut result = TurnResult::default();
    let schemas = opts.tools.as_ref().map(|t| t.template_json(lang.code())).unwrap_or_default();
    // Leave room for a real reply, not just a few tokens.
    let reply_room = opts.max_tokens.min(engine.info.context_length / 4).max(16);
    loop {
        let n = engine.info.prompt.tokens(&engine.info.tokenizer, &messages, &schemas)?.len();
        if n + reply_room < engine.info.context_length || messages.len() <= 2 {
            break;
        }
        // Drop the oldest exchange after the system prompt.
        messages.remove(1);
        while messages.len() > 2 && messages[1].role != "user" {
            messages.remove(1);
        }
        result.dropped_turns += 1;
    }
    let req = Request {
        session: Some(opts.session.clone()),
        prompt: Prompt::Chat {
            messages: messages.clone(),
            tools: opts.tools.clone(),
            lang: lang.code().into(),
        },
        max_tokens: opts.max_tokens,
        sampling: opts.sampling,
        stop: Vec::new(),
        constrain_tools: opts.constrain,
        grammar_tools: None,
        require_call: false,
        share_prefix: true,
        grammar: None,
        compiled: Default::default(),
    };
    let mut rx = engine.submit(req)?;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Delta(t) => {
                result.text.push_str(&t);
                let _ = write!(out, "{t}");
                let _ = out.flush();
            }
            Event::ToolCall { call, error } => {
                let args = serde_json::to_string(&call.arguments).unwrap_or_default();
                let verdict = match &error {
                    None => "valid".to_string(),
                    Some(e) => format!("INVALID: {e}"),
                };
                let _ = writeln!(out, "\n→ tool call {}({args}) [{verdict}]", call.name);
                result.calls.push((call, error));
            }
            Event::ToolCallMalformed { reason, .. } => {
                let _ = writeln!(out, "\n→ malformed tool call: {reason}");
            }
            Event::Done(u) => result.usage = Some(u),
            Event::Error(e) => return Err(EngineError::Internal(e)),
        }
    }
    let mut reply = Message::assistant(result.text.trim().to_owned());
    if !result.calls.is_empty() {
        reply.tool_calls = Some(
            result
                .calls
                .iter()
                .map(|(c, _)| TemplateToolCall {
                    kind: "function".into(),
                    function: TemplateFunction {
                        name: c.name.clone(),
                        arguments: serde_json::Value::Object(c.arguments.clone()),
                    },
                })
                .collect(),
        );
        let _ = writeln!(out, "  (the bare-model chat only shows calls; without --no-tools they run)");
    }
    messages.push(reply);
    conv.messages = messages;
    if result.dropped_turns > 0 {
        let _ = writeln!(
            out,
            "  ({} older turn(s) were dropped to fit the model's context)",
            result.dropped_turns
        );
    }
    Ok(result)
}

/// The interactive loop: reads lines from `input` until EOF or `/quit`.
pub fn repl<R: BufRead, W: Write>(
    engine: &Engine,
    mut opts: ChatOptions,
    input: R,
    out: &mut W,
    interactive: bool,
) -> std::io::Result<()> {
    let mut conv = Conversation {
        messages: Vec::new(),
        lang: opts.lang,
    };
    let prompt = |out: &mut W| {
        if interactive {
            let _ = write!(out, "\n> ");
            let _ = out.flush();
        }
    };
    prompt(out);
    for line in input.lines() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            prompt(out);
            continue;
        }
        match line {
            "/quit" | "/exit" => break,
            "/help" => writeln!(out, "{HELP}")?,
            "/reset" => {
                conv = Conversation {
                    messages: Vec::new(),
                    lang: opts.lang,
                };
                writeln!(out, "(new conversation)")?;
            }
            "/stats" => {
                opts.stats = !opts.stats;
                writeln!(out, "(stats {})", if opts.stats { "on" } else { "off" })?;
            }
            "/constrain on" | "/constrain off" => {
                opts.constrain = line.ends_with("on");
                writeln!(out, "(constrained tool calls {})", if opts.constrain { "on" } else { "off" })?;
            }
            l if l.starts_with("/lang ") => match Lang::parse(l[6..].trim()) {
                Some(lang) => {
                    opts.lang = Some(lang);
                    conv = Conversation {
                        messages: Vec::new(),
                        lang: Some(lang),
                    };
                    writeln!(out, "(language {}; new conversation)", lang.code())?;
                }
                None => writeln!(out, "unknown language; use en, zh or ko")?,
            },
            l if l.starts_with('/') => writeln!(out, "unknown command. {HELP}")?,
            text => match turn(engine, &opts, &mut conv, text, out) {
                Ok(r) => {
                    writeln!(out)?;
                    if opts.stats {
                        if let Some(u) = r.usage {
                            writeln!(
                                out,
                                "  [{} prompt tokens ({} cached), {} generated, first token {:.0} ms, {:.1} tok/s]",
                                u.prompt_tokens,
                                u.cached_tokens,
                                u.completion_tokens,
                                u.ttft_ms,
                                u.decode_tok_per_s()
                            )?;
                        }
                    }
                }
                Err(e) => {
                    // The conversation is unchanged; the user can retry.
                    writeln!(out, "\nerror: {e}")?;
                }
            },
        }
        prompt(out);
    }
    Ok(())
}

/// What the agent REPL remembers between lines: the open confirmation and
/// the options of the last card, so "yes" and "2" mean something.
#[derive(Default)]
pub struct AgentView {
    pub pending: Option<crate::agent::ConfirmationRequest>,
    pub options: Vec<crate::agent::present::CardOption>,
}

const YES: [&str; 13] = ["yes", "y", "ok", "confirm", "pay", "确认", "好", "好的", "是", "支付", "네", "예", "확인"];
const NO: [&str; 10] = ["no", "n", "cancel", "decline", "不", "不要", "取消", "아니요", "아니", "취소"];

impl AgentView {
    /// Maps a typed line to an input: yes/no answer an open confirmation, a
    /// number picks a card option, anything else is a message.
    pub fn input(&self, line: &str) -> crate::agent::Input {
        use crate::agent::Input;
        let l = line.trim().trim_end_matches(['.', '!', '。', '！']).to_lowercase();
        if let Some(p) = &self.pending {
            if YES.contains(&l.as_str()) {
                return Input::Confirm { token: p.token.clone() };
            }
            if NO.contains(&l.as_str()) {
                return Input::Decline { token: p.token.clone() };
            }
        }
        if let Ok(n) = l.parse::<usize>() {
            if let Some(o) = n.checked_sub(1).and_then(|i| self.options.get(i)) {
                return Input::Text(o.reply.clone());
            }
        }
        Input::Text(line.trim().to_owned())
    }

    /// Prints one event and updates what the next line can refer to.
    pub fn show<W: Write>(&mut self, ev: &crate::agent::AgentEvent, out: &mut W) {
        use crate::agent::present::item_label;
        use crate::world::money::display as money;
        use crate::agent::AgentEvent as E;
        match ev {
            E::Token { text } => {
                let _ = write!(out, "{text}");
            }
            E::Notice { text } => {
                let _ = writeln!(out, "\n{text}");
            }
            E::ToolCall { tool, arguments } => {
                let _ = writeln!(out, "\n  → {tool} {arguments}");
            }
            E::ToolResult { ok: false, detail, .. } => {
                let _ = writeln!(out, "  ✗ {detail}");
            }
            E::ToolResult { .. } => {}
            // The order's card was shown just before.
            E::Order { .. } => {}
            E::Card(c) => {
                let lang = Lang::En;
                if c.options.is_empty() {
                    let _ = writeln!(out, "  ┌ {}: {}", c.kind, item_label(&c.data, lang));
                    for key in ["status", "order_id", "ride_id", "booking_id", "eta_minutes", "seats", "driver"] {
                        if let Some(v) = c.data.get(key).filter(|v| !v.is_null()) {
                            let _ = writeln!(out, "  │ {key}: {v}");
                        }
                    }
                    let _ = writeln!(out, "  └");
                } else {
                    let _ = writeln!(out, "  ┌ {}", c.kind);
                    for (i, o) in c.options.iter().enumerate() {
                        let _ = writeln!(out, "  │ [{}] {} ({})", i + 1, o.label, o.id);
                    }
                    let _ = writeln!(out, "  └ type a number to choose");
                    self.options = c.options.clone();
                }
            }
            E::Confirmation(r) => {
                let _ = writeln!(out, "\n  ┌ please confirm ─────────────────────────");
                let _ = writeln!(out, "  │ {}", r.summary);
                let _ = writeln!(out, "  │ amount: {}   pay with: {}", r.amount_display, r.payment_method);
                let _ = writeln!(out, "  └ type yes to confirm, no to decline, or say what to change");
                self.pending = Some(r.clone());
            }
            E::Payment(p) => {
                let amount = money(p.amount, &p.currency);
                if p.status == "paid" {
                    let _ = writeln!(out, "  ✓ paid {amount} ({})", p.transaction_id.as_deref().unwrap_or(&p.out_trade_no));
                } else {
                    let _ = writeln!(out, "  ✗ payment of {amount} failed: {}", p.reason.as_deref().unwrap_or("unknown"));
                }
            }
            E::Done { stats } => {
                if std::env::var_os("ERRAND_STATS").is_some() {
                    let _ = writeln!(
                        out,
                        "\n  [{} rounds, {} prompt tokens ({} cached), {} generated, first token {:.0} ms, total {:.0} ms]",
                        stats.model_rounds,
                        stats.prompt_tokens,
                        stats.cached_tokens,
                        stats.completion_tokens,
                        stats.first_token_ms.unwrap_or(0.0),
                        stats.total_ms
                    );
                }
            }
            E::Error { message } => {
                let _ = writeln!(out, "\nerror: {message}");
            }
        }
        let _ = out.flush();
    }
}

/// The REPL when mini-programs are on: every line goes through the agent.
pub fn agent_repl<R: BufRead, W: Write>(
    rt: &tokio::runtime::Handle,
    agent: &Arc<crate::agent::Agent>,
    session: &str,
    input: R,
    out: &mut W,
    interactive: bool,
) -> std::io::Result<()> {
    let _in_runtime = rt.enter();
    let mut view = AgentView::default();
    let prompt = |out: &mut W| {
        if interactive {
            let _ = write!(out, "\n> ");
            let _ = out.flush();
        }
    };
    prompt(out);
    for line in input.lines() {
        let line = line?;
        match line.trim() {
            "" => {}
            "/quit" | "/exit" => break,
            "/reset" => {
                agent.reset(session);
                view = AgentView::default();
                writeln!(out, "(new conversation)")?;
            }
            l if l.starts_with('/') => writeln!(out, "{AGENT_HELP}")?,
            l => {
                let input = view.input(l);
                if !matches!(input, crate::agent::Input::Text(_)) || view.pending.is_some() {
                    // Any answer closes the open confirmation on our side.
                    view.pending = None;
                }
                let mut rx = agent.handle(session, input);
                while let Some(ev) = rt.block_on(rx.recv()) {
                    view.show(&ev, out);
                }
                writeln!(out)?;
            }
        }
        prompt(out);
    }
    Ok(())
}
