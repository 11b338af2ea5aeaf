//! `errand chat`: a terminal conversation with streaming replies.
//!
//! It shows the tool calls the model makes against the tools in `tools/`,
//! checked against their schemas. No mini-program services run yet, so a
//! call is shown and recorded in the conversation, not executed.
//!
//! Context policy: the engine refuses prompts longer than the model's
//! context; the REPL then drops the oldest turns (never the system prompt)
//! and says so.
//!
//! Generic over input and output so tests can drive it.

use crate::engine::{Engine, EngineError, Event, Prompt, Request, Usage};
use crate::engine::sampler::SamplingParams;
use crate::prompt::{now_unix, Lang};
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
            .push(Message::system(engine.info.prompt.prompts.system(lang, now_unix())));
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
        let _ = writeln!(
            out,
            "  (no mini-program services run in this build yet: the call is shown, not executed)"
        );
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
