//! The OpenAI-compatible API: `POST /v1/chat/completions` (plain and
//! streamed), `GET /v1/models` and `GET /v1/models/{id}`, for users' bearer
//! tokens (the API key of an OpenAI client).
//!
//! Requests go straight to the engine, without the agent: the client owns
//! the conversation and runs its own tools. Each user's requests share one
//! engine session (`openai:<user>`), so a conversation that grows turn by
//! turn only prefills its new messages.
//!
//! Tools are always decoded under the llguidance grammar, so every call the
//! API returns fits its schema. `tool_choice: "required"` (or a named
//! function) removes the grammar's plain-text alternative. Tool names that
//! OpenAI allows but Errand's tool names do not (`getWeather`, `read-file`)
//! are shown to the model under a snake_case alias and mapped back in
//! replies and in the history the client sends.
//!
//! Unsupported parts of the API are refused with a 400 that says so
//! (`n` > 1, `response_format` other than text, `logprobs`, image parts);
//! unknown fields are ignored. Sampling starts from Errand's chat defaults
//! (temperature 0.7, top-k 40, top-p 0.9, repeat penalty 1.1) and the
//! request's `temperature`, `top_p` and `seed` override them.

use super::auth::UserAuth;
use super::error::ApiError;
use super::AppState;
use crate::engine::sampler::SamplingParams;
use crate::engine::{EngineError, Event, FinishReason, Prompt, Request, Usage};
use crate::template::{Message, TemplateFunction, TemplateToolCall};
use crate::tools::{Localized, Tool, ToolCall, ToolDef, ToolSet};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Largest request body.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Reply length when the request sets none (the engine also stops at the
/// end of the context).
pub const DEFAULT_MAX_TOKENS: usize = 4096;
/// Model names accepted besides the served model's id.
pub const MODEL_ALIASES: [&str; 2] = ["errand", "default"];
/// Most stop strings per request.
const MAX_STOP: usize = 16;
/// The app name tools from requests are registered under.
const APP: &str = "openai";

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

// ---------------------------------------------------------------------------
// Request shapes. Every field the API defines that Errand does not use is
// simply not declared: serde ignores unknown fields.

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<InMessage>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub seed: Option<serde_json::Number>,
    #[serde(default)]
    pub stop: Option<Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub tools: Option<Vec<InTool>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub response_format: Option<Value>,
    #[serde(default)]
    pub logprobs: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct InMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Value>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<InToolCall>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct InToolCall {
    #[serde(default)]
    pub id: Option<String>,
    pub function: InFunctionCall,
}

#[derive(Debug, Deserialize)]
pub struct InFunctionCall {
    pub name: String,
    /// A JSON string in the API; an object is accepted too.
    #[serde(default)]
    pub arguments: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct InTool {
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: InFunction,
}

fn function_type() -> String {
    "function".into()
}

#[derive(Debug, Deserialize)]
pub struct InFunction {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
}

// ---------------------------------------------------------------------------
// Tool names: OpenAI's `[a-zA-Z0-9_-]{1,64}` against Errand's `[a-z][a-z0-9_]*`.

/// Client tool names and the names the model sees, both ways. Names that
/// are already valid Errand names map to themselves.
#[derive(Debug, Default, Clone)]
pub struct ToolNames {
    to_model: HashMap<String, String>,
    to_client: HashMap<String, String>,
}

impl ToolNames {
    /// The name the model knows a client's tool by.
    pub fn model<'a>(&'a self, client: &'a str) -> &'a str {
        self.to_model.get(client).map(String::as_str).unwrap_or(client)
    }

    /// The client's name for a tool the model called.
    pub fn client<'a>(&'a self, model: &'a str) -> &'a str {
        self.to_client.get(model).map(String::as_str).unwrap_or(model)
    }

    fn insert(&mut self, client: &str, model: &str) {
        self.to_model.insert(client.to_owned(), model.to_owned());
        self.to_client.insert(model.to_owned(), client.to_owned());
    }
}

fn errand_name_ok(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && s.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn openai_name_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `getWeather` → `get_weather`, `read-file` → `read_file`, `2fa` → `fn_2fa`.
fn snake_alias(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    let mut after_word = false;
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            if after_word && !out.ends_with('_') {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
            after_word = false;
        } else if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
            after_word = true;
        } else {
            out.push('_');
            after_word = false;
        }
    }
    if !out.starts_with(|c: char| c.is_ascii_lowercase()) {
        out.insert_str(0, "fn_");
    }
    out.truncate(64);
    out
}

/// Aliases for every name, unique among themselves and the valid names.
fn alias_names(names: &[&str]) -> ToolNames {
    let mut map = ToolNames::default();
    let mut used: HashSet<String> = names.iter().filter(|n| errand_name_ok(n)).map(|n| n.to_string()).collect();
    for &n in names {
        if errand_name_ok(n) {
            map.insert(n, n);
            continue;
        }
        let base = snake_alias(n);
        let mut alias = base.clone();
        let mut k = 2;
        while used.contains(&alias) {
            let suffix = format!("_{k}");
            let mut b = base.clone();
            b.truncate(64 - suffix.len());
            alias = format!("{b}{suffix}");
            k += 1;
        }
        used.insert(alias.clone());
        map.insert(n, &alias);
    }
    map
}

// ---------------------------------------------------------------------------
// Validation: request → what the engine needs.

/// `tool_choice`, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A validated request, ready for the engine.
#[derive(Debug)]
pub struct Prepared {
    pub messages: Vec<Message>,
    /// Tools shown to the model (none for `tool_choice: "none"`).
    pub tools: Option<Arc<ToolSet>>,
    /// For a named function: only that one in the grammar.
    pub grammar_tools: Option<Arc<ToolSet>>,
    pub require_call: bool,
    pub choice: ToolChoice,
    pub names: ToolNames,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// `parallel_tool_calls: false`: only the first call is returned.
    pub single_call: bool,
}

impl Prepared {
    /// The engine request; takes the messages.
    pub fn engine_request(&mut self, session: Option<String>) -> Request {
        Request {
            session,
            prompt: Prompt::Chat {
                messages: std::mem::take(&mut self.messages),
                tools: self.tools.clone(),
                lang: "en".into(),
            },
            max_tokens: self.max_tokens,
            sampling: self.sampling,
            stop: self.stop.clone(),
            constrain_tools: self.tools.is_some(),
            grammar_tools: self.grammar_tools.clone(),
            require_call: self.require_call,
            share_prefix: true,
            grammar: None,
            compiled: Default::default(),
        }
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message)
}

fn model_not_found(asked: &str, served: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "model_not_found",
        format!(
            "the model `{asked}` does not exist on this server; it serves `{served}` \
             (also reachable as `errand` or `default`); GET /v1/models lists it"
        ),
    )
}

fn serves(model_id: &str, asked: &str) -> bool {
    asked == model_id || MODEL_ALIASES.contains(&asked)
}

/// Parses a request body (unknown fields are ignored).
pub fn parse_body(body: &[u8]) -> Result<ChatRequest, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("the body is not a valid chat completion request: {e}")))
}

/// Checks everything that can be checked without the model.
pub fn prepare(req: ChatRequest, model_id: &str) -> Result<Prepared, ApiError> {
    if let Some(m) = req.model.as_deref() {
        if !serves(model_id, m) {
            return Err(model_not_found(m, model_id));
        }
    }
    match req.n {
        None | Some(1) => {}
        Some(n) => return Err(bad(format!("`n` must be 1 (got {n}); this server returns one choice per request"))),
    }
    if req.logprobs == Some(true) {
        return Err(bad("`logprobs` is not supported by this server"));
    }
    check_response_format(req.response_format.as_ref())?;

    // Tools and tool_choice.
    let in_tools = req.tools.unwrap_or_default();
    let (tools, names) = build_tools(&in_tools)?;
    let choice = parse_tool_choice(req.tool_choice.as_ref(), &in_tools)?;
    let (offered, grammar_tools, require_call) = match &choice {
        ToolChoice::None => (None, None, false),
        ToolChoice::Auto => (Some(Arc::new(ToolSet::from_tools(tools))), None, false),
        ToolChoice::Required => (Some(Arc::new(ToolSet::from_tools(tools))), None, true),
        ToolChoice::Named(name) => {
            let i = in_tools.iter().position(|t| &t.function.name == name).expect("checked in parse_tool_choice");
            let only = Tool::new(APP, tools[i].def.clone()).map_err(bad)?;
            (
                Some(Arc::new(ToolSet::from_tools(tools))),
                Some(Arc::new(ToolSet::from_tools(vec![only]))),
                true,
            )
        }
    };

    let messages = convert_messages(req.messages, &names)?;

    // Sampling.
    let seed = match &req.seed {
        Some(n) => n
            .as_u64()
            .or_else(|| n.as_i64().map(|i| i as u64))
            .ok_or_else(|| bad(format!("`seed` must be an integer (got {n})")))?,
        None => rand::random::<u64>(),
    };
    let mut sampling = SamplingParams::chat(seed);
    if let Some(t) = req.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(bad(format!("`temperature` must be between 0 and 2 (got {t})")));
        }
        sampling.temperature = t as f32;
    }
    if let Some(p) = req.top_p {
        if !(0.0..=1.0).contains(&p) {
            return Err(bad(format!("`top_p` must be between 0 and 1 (got {p})")));
        }
        // 0 means "only the most likely token"; the sampler wants > 0.
        sampling.top_p = (p as f32).max(1e-6);
    }
    let max_tokens = match req.max_completion_tokens.or(req.max_tokens) {
        None => DEFAULT_MAX_TOKENS,
        Some(n) if n < 1 => return Err(bad(format!("`max_tokens` must be at least 1 (got {n})"))),
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
    };
    let stop = parse_stop(req.stop.as_ref())?;

    Ok(Prepared {
        messages,
        tools: offered,
        grammar_tools,
        require_call,
        choice,
        names,
        sampling,
        max_tokens,
        stop,
        stream: req.stream.unwrap_or(false),
        include_usage: req.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        single_call: req.parallel_tool_calls == Some(false),
    })
}

fn check_response_format(v: Option<&Value>) -> Result<(), ApiError> {
    let kind = match v {
        None | Some(Value::Null) => return Ok(()),
        Some(v) => v.get("type").and_then(Value::as_str),
    };
    match kind {
        Some("text") => Ok(()),
        Some(k) => Err(bad(format!(
            "`response_format` of type `{k}` is not supported by this server; only {{\"type\": \"text\"}} is \
             (ask for JSON in the prompt, or define a tool with the schema you need)"
        ))),
        None => Err(bad("`response_format` must be an object with a `type`; this server supports only {\"type\": \"text\"}")),
    }
}

fn parse_stop(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let stops: Vec<String> = match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| x.as_str().map(str::to_owned).ok_or_else(|| bad("`stop` must be a string or an array of strings")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("`stop` must be a string or an array of strings")),
    };
    if stops.len() > MAX_STOP {
        return Err(bad(format!("`stop` may hold at most {MAX_STOP} strings (got {})", stops.len())));
    }
    Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
}

/// Compiles the request's tools (schemas must compile) with model names.
fn build_tools(tools: &[InTool]) -> Result<(Vec<Tool>, ToolNames), ApiError> {
    let mut seen = HashSet::new();
    for (i, t) in tools.iter().enumerate() {
        if t.kind != "function" {
            return Err(bad(format!("tools[{i}].type must be \"function\" (got \"{}\")", t.kind)));
        }
        let name = &t.function.name;
        if !openai_name_ok(name) {
            return Err(bad(format!(
                "tools[{i}].function.name `{name}` must be 1-64 characters of a-z, A-Z, 0-9, _ and -"
            )));
        }
        if !seen.insert(name.as_str()) {
            return Err(bad(format!("tools[{i}]: the function `{name}` is defined twice")));
        }
    }
    let all: Vec<&str> = tools.iter().map(|t| t.function.name.as_str()).collect();
    let names = alias_names(&all);
    let mut out = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let f = &t.function;
        let model_name = names.model(&f.name).to_owned();
        let mut parameters = f.parameters.clone().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        if let Value::Object(o) = &mut parameters {
            if !o.contains_key("type") {
                o.insert("type".into(), json!("object"));
            }
        }
        let description = f.description.as_deref().map(str::trim).filter(|d| !d.is_empty()).unwrap_or(&f.name).to_owned();
        let def = ToolDef {
            name: model_name.clone(),
            description: Localized { en: description, zh: None, ko: None },
            parameters,
            confirm: false,
            endpoint: None,
            card: None,
            quote: None,
            result: None,
            role: None,
            order_id: None,
            final_statuses: Vec::new(),
        };
        let tool = Tool::new(APP, def).map_err(|e| {
            // Say it with the client's name for the function.
            let e = e.replace(&format!("`{model_name}`"), &format!("`{}`", f.name));
            bad(format!("tools[{i}]: {e}"))
        })?;
        out.push(tool);
    }
    Ok((out, names))
}

fn parse_tool_choice(v: Option<&Value>, tools: &[InTool]) -> Result<ToolChoice, ApiError> {
    let have = !tools.is_empty();
    let choice = match v {
        None | Some(Value::Null) => {
            if have {
                ToolChoice::Auto
            } else {
                ToolChoice::None
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(format!(
                    "`tool_choice` \"{other}\" is not one of \"none\", \"auto\", \"required\" \
                     or {{\"type\": \"function\", \"function\": {{\"name\": …}}}}"
                )))
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| o.get("type").and_then(Value::as_str).unwrap_or("function") == "function");
            match name {
                Some(n) => ToolChoice::Named(n.to_owned()),
                None => {
                    return Err(bad(
                        "`tool_choice` as an object must be {\"type\": \"function\", \"function\": {\"name\": …}}",
                    ))
                }
            }
        }
        Some(_) => return Err(bad("`tool_choice` must be a string or an object")),
    };
    if !have && matches!(choice, ToolChoice::Required | ToolChoice::Named(_)) {
        return Err(bad("`tool_choice` requires a tool call but the request has no `tools`"));
    }
    if let ToolChoice::Named(n) = &choice {
        if !tools.iter().any(|t| &t.function.name == n) {
            let known: Vec<&str> = tools.iter().map(|t| t.function.name.as_str()).collect();
            return Err(bad(format!(
                "`tool_choice` names the function `{n}`, which is not in `tools` (they are: {})",
                known.join(", ")
            )));
        }
    }
    if choice == ToolChoice::Auto && !have {
        return Ok(ToolChoice::None);
    }
    Ok(choice)
}

/// Message content: a string, null, or an array of text parts.
fn content_text(c: Option<&Value>, at: &str) -> Result<String, ApiError> {
    match c {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, p) in parts.iter().enumerate() {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                let field = match kind {
                    "text" => "text",
                    "refusal" => "refusal",
                    "" => return Err(bad(format!("{at}.content[{j}] has no `type`; text parts are {{\"type\": \"text\", \"text\": …}}"))),
                    other => {
                        return Err(bad(format!(
                            "{at}.content[{j}]: `{other}` parts are not supported; this model reads text parts only"
                        )))
                    }
                };
                let t = p
                    .get(field)
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("{at}.content[{j}] needs a `{field}` string")))?;
                texts.push(t);
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(bad(format!("{at}.content must be a string or an array of content parts"))),
    }
}

/// Arguments in history: a JSON string (the API's form) becomes the object
/// templates expect; a string that is not JSON is kept as it is.
fn history_arguments(a: Option<Value>) -> Value {
    match a {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::String(s)) if s.trim().is_empty() => Value::Object(Map::new()),
        Some(Value::String(s)) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        Some(v) => v,
    }
}

/// OpenAI messages → template messages.
pub fn convert_messages(msgs: Vec<InMessage>, names: &ToolNames) -> Result<Vec<Message>, ApiError> {
    if msgs.is_empty() {
        return Err(bad("`messages` must hold at least one message"));
    }
    // tool_call_id → the model's name for the tool, for tool results.
    let mut call_names: HashMap<String, String> = HashMap::new();
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.into_iter().enumerate() {
        let at = format!("messages[{i}]");
        let content = content_text(m.content.as_ref(), &at)?;
        let msg = match m.role.as_str() {
            "system" | "developer" => Message::system(content),
            "user" => Message::user(content),
            "assistant" => {
                let mut msg = Message::assistant(content);
                let calls = m.tool_calls.unwrap_or_default();
                if !calls.is_empty() {
                    let mut out_calls = Vec::with_capacity(calls.len());
                    for c in calls {
                        let name = names.model(&c.function.name).to_owned();
                        if let Some(id) = c.id {
                            call_names.insert(id, name.clone());
                        }
                        out_calls.push(TemplateToolCall {
                            kind: "function".into(),
                            function: TemplateFunction {
                                name,
                                arguments: history_arguments(c.function.arguments),
                            },
                        });
                    }
                    msg.tool_calls = Some(out_calls);
                }
                msg
            }
            "tool" => {
                let mut msg = Message::tool(content);
                msg.name = m
                    .tool_call_id
                    .as_ref()
                    .and_then(|id| call_names.get(id).cloned())
                    .or_else(|| m.name.as_deref().map(|n| names.model(n).to_owned()));
                msg
            }
            "function" => {
                return Err(bad(format!(
                    "{at}: the `function` role is deprecated and not supported; send tool results with role `tool`"
                )))
            }
            other => {
                return Err(bad(format!(
                    "{at}.role `{other}` is not one of system, developer, user, assistant, tool"
                )))
            }
        };
        out.push(msg);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Errors from the engine.

/// An error the engine reported as an event (its text; see `EngineError`).
pub fn engine_error(msg: &str) -> ApiError {
    if msg.contains("but the model's context is") {
        ApiError::new(StatusCode::BAD_REQUEST, "context_length_exceeded", msg)
    } else if msg.starts_with("rendering the chat template failed") {
        bad(format!("the conversation cannot be rendered with the model's chat template: {msg}"))
    } else if msg.starts_with("building the constraint failed") {
        bad(format!("the tools' parameter schemas cannot be used for constrained decoding: {msg}"))
    } else if msg.starts_with("invalid request:") {
        bad(msg)
    } else {
        ApiError::internal(msg)
    }
}

fn submit_error(e: EngineError) -> ApiError {
    match e {
        EngineError::Busy(_) => ApiError::busy(e.to_string()),
        EngineError::Invalid(_) | EngineError::PromptTooLong { .. } => engine_error(&e.to_string()),
        other => ApiError::internal(other),
    }
}

fn body_error(r: BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(MAX_BODY_BYTES)
    } else {
        bad(format!("cannot read the request body: {}", r.body_text()))
    }
}

// ---------------------------------------------------------------------------
// Replies.

fn random_id(prefix: &str, n: usize) -> String {
    use rand::Rng;
    let s: String = rand::rng().sample_iter(rand::distr::Alphanumeric).take(n).map(char::from).collect();
    format!("{prefix}{s}")
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

fn finish_reason(f: FinishReason, calls: usize) -> &'static str {
    if calls > 0 {
        "tool_calls"
    } else if f == FinishReason::Length {
        "length"
    } else {
        "stop"
    }
}

/// A call as the API returns it.
#[derive(Debug, Clone)]
pub struct OutCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// Turns engine events into the API's shapes, for both plain and streamed
/// replies.
pub struct ReplyBuilder {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
    names: ToolNames,
    single_call: bool,
    /// Client names of the calls returned, for metrics.
    pub calls: Vec<OutCall>,
    /// Whitespace held back in a stream until text follows (dropped before
    /// a tool call, so a calls-only reply has no stray content).
    held: String,
    /// The content so far.
    pub text: String,
}

/// What one engine event did to the reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Continue,
    Done,
    Failed,
}

impl ReplyBuilder {
    /// `created`: the reply's Unix time in seconds, by the server's clock.
    pub fn new(model: &str, p: &Prepared, created: u64) -> Self {
        Self {
            id: random_id("chatcmpl-", 29),
            created,
            model: model.to_owned(),
            include_usage: p.include_usage,
            names: p.names.clone(),
            single_call: p.single_call,
            calls: Vec::new(),
            held: String::new(),
            text: String::new(),
        }
    }

    /// Adds a call unless `parallel_tool_calls: false` already has one.
    fn add_call(&mut self, call: &ToolCall, error: Option<String>) -> Option<OutCall> {
        if let Some(e) = error {
            // Only possible unconstrained; returned anyway.
            eprintln!("errand serve: openai: the model's call to `{}` does not validate: {e}", call.name);
        }
        if self.single_call && !self.calls.is_empty() {
            return None;
        }
        let c = OutCall {
            id: random_id("call_", 24),
            name: self.names.client(&call.name).to_owned(),
            arguments: serde_json::to_string(&call.arguments).unwrap_or_else(|_| "{}".into()),
        };
        self.calls.push(c.clone());
        Some(c)
    }

    /// The whole reply, from every event (non-streaming), and its usage.
    pub fn collect(&mut self, events: Vec<Event>) -> Result<(Value, Usage), ApiError> {
        let mut usage = None;
        for ev in events {
            match ev {
                Event::Delta(t) => self.text.push_str(&t),
                Event::ToolCall { call, error } => {
                    self.add_call(&call, error);
                }
                Event::ToolCallMalformed { reason, raw } => {
                    eprintln!("errand serve: openai: a malformed tool call is returned as text: {reason}");
                    self.text.push_str(&raw);
                }
                Event::Done(u) => usage = Some(u),
                Event::Error(e) => return Err(engine_error(&e)),
            }
        }
        let usage = usage.ok_or_else(|| ApiError::internal("the engine ended a reply without finishing it"))?;
        let content = if !self.calls.is_empty() && self.text.trim().is_empty() {
            Value::Null
        } else {
            Value::String(self.text.clone())
        };
        let mut message = json!({"role": "assistant", "content": content, "refusal": null});
        if !self.calls.is_empty() {
            message["tool_calls"] = self
                .calls
                .iter()
                .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                .collect();
        }
        let body = json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": message,
                "logprobs": null,
                "finish_reason": finish_reason(usage.finish, self.calls.len()),
            }],
            "usage": usage_json(&usage),
        });
        Ok((body, usage))
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> String {
        let mut c = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c.to_string()
    }

    /// The stream's first chunk.
    pub fn first_chunk(&self) -> String {
        self.chunk(json!({"role": "assistant", "content": ""}), None)
    }

    /// SSE data for one event of a stream (`None`: the engine closed the
    /// channel without a last event). Returns the data lines and whether
    /// the stream ends; a `Done` also returns its usage for metrics.
    pub fn stream_event(&mut self, ev: Option<Event>) -> (Vec<String>, Step, Option<Usage>) {
        let mut out = Vec::new();
        match ev {
            Some(Event::Delta(t)) => self.stream_text(t, &mut out),
            Some(Event::ToolCallMalformed { reason, raw }) => {
                eprintln!("errand serve: openai: a malformed tool call is returned as text: {reason}");
                self.stream_text(raw, &mut out);
            }
            Some(Event::ToolCall { call, error }) => {
                self.held.clear();
                if let Some(c) = self.add_call(&call, error) {
                    let index = self.calls.len() - 1;
                    out.push(self.chunk(
                        json!({"tool_calls": [{
                            "index": index,
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments},
                        }]}),
                        None,
                    ));
                }
            }
            Some(Event::Done(u)) => {
                if self.calls.is_empty() && !self.held.is_empty() {
                    let t = std::mem::take(&mut self.held);
                    self.text.push_str(&t);
                    out.push(self.chunk(json!({"content": t}), None));
                }
                out.push(self.chunk(json!({}), Some(finish_reason(u.finish, self.calls.len()))));
                if self.include_usage {
                    out.push(
                        json!({
                            "id": self.id,
                            "object": "chat.completion.chunk",
                            "created": self.created,
                            "model": self.model,
                            "choices": [],
                            "usage": usage_json(&u),
                        })
                        .to_string(),
                    );
                }
                out.push("[DONE]".into());
                return (out, Step::Done, Some(u));
            }
            Some(Event::Error(e)) => {
                out.push(error_data(&engine_error(&e)));
                return (out, Step::Failed, None);
            }
            None => {
                out.push(error_data(&ApiError::internal("the engine ended a reply without finishing it")));
                return (out, Step::Failed, None);
            }
        }
        (out, Step::Continue, None)
    }

    fn stream_text(&mut self, t: String, out: &mut Vec<String>) {
        if t.trim().is_empty() {
            self.held.push_str(&t);
            return;
        }
        let t = if self.held.is_empty() { t } else { std::mem::take(&mut self.held) + &t };
        self.text.push_str(&t);
        out.push(self.chunk(json!({"content": t}), None));
    }
}

/// `{"error": {...}}` as SSE data, the way OpenAI reports errors in a stream.
fn error_data(e: &ApiError) -> String {
    json!({"error": {"message": e.message, "type": e.code, "code": e.code}}).to_string()
}

/// Token counts, time to first token and returned calls.
fn record(state: &AppState, u: &Usage, calls: &[OutCall]) {
    let m = &state.metrics;
    m.add("errand_tokens_total", &[("kind", "prompt")], u.prompt_tokens as f64);
    m.add("errand_tokens_total", &[("kind", "cached")], u.cached_tokens as f64);
    m.add("errand_tokens_total", &[("kind", "completion")], u.completion_tokens as f64);
    if u.ttft_ms > 0.0 {
        m.observe("errand_ttft_seconds", (u.queue_ms + u.ttft_ms) / 1000.0);
    }
    // The tools are the client's own: one label value keeps the number of
    // series bounded whatever names clients send.
    m.add("errand_tool_calls_total", &[("tool", "openai_client"), ("outcome", "proposed")], calls.len() as f64);
}

/// The SSE stream of one reply. It owns the engine's receiver: when the
/// client goes away, axum drops the stream, the receiver goes with it and
/// the engine stops generating.
struct ChunkStream {
    rx: Option<mpsc::Receiver<Event>>,
    queue: VecDeque<String>,
    reply: ReplyBuilder,
    state: Arc<AppState>,
}

impl ChunkStream {
    fn feed(&mut self, ev: Option<Event>) {
        let (data, step, usage) = self.reply.stream_event(ev);
        self.queue.extend(data);
        if let Some(u) = usage {
            record(&self.state, &u, &self.reply.calls);
        }
        if step != Step::Continue {
            self.rx = None;
        }
    }
}

impl futures_util::Stream for ChunkStream {
    type Item = Result<SseEvent, std::convert::Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(data) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(SseEvent::default().data(data))));
            }
            let Some(rx) = this.rx.as_mut() else {
                return Poll::Ready(None);
            };
            match rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(ev) => this.feed(ev),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Handlers.

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    user: UserAuth,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| {
        let e = body_error(r);
        if e.status == StatusCode::PAYLOAD_TOO_LARGE {
            state.metrics.inc("errand_rejected_total", &[("reason", "size")]);
        }
        e
    })?;
    let req = parse_body(&body)?;
    state.admit(&user.id)?;
    let mut p = prepare(req, &state.model_id)?;
    let mut reply = ReplyBuilder::new(&state.model_id, &p, state.clock.now_s().max(0) as u64);
    // The client's schemas become a grammar here, on a blocking thread,
    // never on the engine thread every session shares (issue 23, finding 8).
    let compiled = match p.grammar_tools.clone().or_else(|| p.tools.clone()) {
        None => Default::default(),
        Some(tools) => {
            let (engine, require) = (state.engine.clone(), p.require_call);
            tokio::task::spawn_blocking(move || engine.compile_tools(&tools, require))
                .await
                .map_err(|e| ApiError::internal(format!("compiling the tools' grammar failed: {e}")))?
                .map_err(|e| engine_error(&e.to_string()))?
        }
    };
    let mut request = p.engine_request(Some(format!("openai:{}", user.id)));
    request.compiled = compiled;
    let mut rx = state
        .engine
        .submit(request)
        .map_err(|e| {
            if matches!(e, EngineError::Busy(_)) {
                state.metrics.inc("errand_rejected_total", &[("reason", "busy")]);
            }
            submit_error(e)
        })?;

    if !p.stream {
        let mut events = Vec::new();
        while let Some(ev) = rx.recv().await {
            events.push(ev);
        }
        drop(rx);
        let (body, usage) = reply.collect(events)?;
        record(&state, &usage, &reply.calls);
        return Ok(Json(body).into_response());
    }

    // Wait for the first event, so a request the engine refuses before
    // generating (too long, a template or schema it cannot use) still gets
    // a proper HTTP status instead of an error inside a 200 stream.
    let first = rx.recv().await;
    match &first {
        Some(Event::Error(e)) => return Err(engine_error(e)),
        None => return Err(ApiError::internal("the engine ended a reply without starting it")),
        Some(_) => {}
    }
    let mut stream = ChunkStream {
        queue: VecDeque::from([reply.first_chunk()]),
        rx: Some(rx),
        reply,
        state: state.clone(),
    };
    stream.feed(first);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// `created` is when the server came up, by its clock.
fn model_object(state: &AppState, id: &str) -> Value {
    json!({"id": id, "object": "model", "created": state.started_ms.div_euclid(1000), "owned_by": "errand"})
}

async fn list_models(State(state): State<Arc<AppState>>, _user: UserAuth) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&state, &state.model_id)]}))
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    _user: UserAuth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if serves(&state.model_id, &id) {
        Ok(Json(model_object(&state, &state.model_id)))
    } else {
        Err(model_not_found(&id, &state.model_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::FinishReason;

    const MODEL: &str = "qwen2.5-coder-0.5b-instruct";

    fn prep(v: Value) -> Result<Prepared, ApiError> {
        prepare(parse_body(v.to_string().as_bytes())?, MODEL)
    }

    fn weather_tool() -> Value {
        json!({"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }})
    }

    fn with_tools(extra: Value) -> Value {
        let mut v = json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [weather_tool(), {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}],
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    fn usage(finish: FinishReason) -> Usage {
        Usage {
            prompt_tokens: 10,
            cached_tokens: 4,
            completion_tokens: 3,
            finish,
            ttft_ms: 5.0,
            prefill_ms: 5.0,
            decode_ms: 2.0,
            queue_ms: 1.0,
        }
    }

    fn call(name: &str, args: Value) -> Event {
        Event::ToolCall {
            call: ToolCall { name: name.into(), arguments: args.as_object().unwrap().clone() },
            error: None,
        }
    }

    #[test]
    fn content_parts_join_and_unknown_fields_are_ignored() {
        let p = prep(json!({
            "model": MODEL,
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}], "name": "bob"},
            ],
            "frequency_penalty": 0.5, "logit_bias": {}, "user": "u-1", "metadata": {"a": 1}, "store": false,
            "stop": null, "temperature": 0, "max_completion_tokens": 7, "seed": 42,
        }))
        .unwrap();
        assert_eq!(p.messages, vec![Message::system("Be brief."), Message::user("Hello\nthere")]);
        assert_eq!(p.max_tokens, 7);
        assert_eq!(p.sampling.temperature, 0.0);
        assert_eq!(p.sampling.seed, 42);
        assert!(p.tools.is_none() && !p.stream && p.choice == ToolChoice::None);
        let e = prep(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("image_url") && e.message.contains("messages[0].content[0]"), "{}", e.message);
        let e = prep(json!({"messages": []})).unwrap_err();
        assert!(e.message.contains("at least one"), "{}", e.message);
        let e = prep(json!({"model": MODEL})).unwrap_err();
        assert!(e.message.contains("messages"), "{}", e.message);
    }

    #[test]
    fn tool_choice_variants() {
        let p = prep(with_tools(json!({}))).unwrap();
        assert_eq!(p.choice, ToolChoice::Auto);
        assert_eq!(p.tools.as_ref().unwrap().len(), 2);
        assert!(!p.require_call && p.grammar_tools.is_none());
        let mut p2 = prep(with_tools(json!({"tool_choice": "auto"}))).unwrap();
        let r = p2.engine_request(Some("openai:alice".into()));
        assert!(r.constrain_tools && !r.require_call);
        assert_eq!(r.session.as_deref(), Some("openai:alice"));

        let p = prep(with_tools(json!({"tool_choice": "none"}))).unwrap();
        assert!(p.tools.is_none() && !p.require_call);
        let mut p = prep(with_tools(json!({"tool_choice": "required"}))).unwrap();
        assert!(p.require_call && p.grammar_tools.is_none());
        assert!(p.engine_request(None).require_call);

        let p = prep(with_tools(json!({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}))).unwrap();
        assert_eq!(p.choice, ToolChoice::Named("get_time".into()));
        assert!(p.require_call);
        assert_eq!(p.tools.as_ref().unwrap().len(), 2, "the prompt still lists every tool");
        let g = p.grammar_tools.as_ref().unwrap();
        assert_eq!(g.len(), 1);
        assert!(g.get("get_time").is_some());

        let e = prep(with_tools(json!({"tool_choice": {"type": "function", "function": {"name": "teleport"}}}))).unwrap_err();
        assert!(e.message.contains("teleport") && e.message.contains("get_weather"), "{}", e.message);
        let e = prep(json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"})).unwrap_err();
        assert!(e.message.contains("no `tools`"), "{}", e.message);
        let e = prep(with_tools(json!({"tool_choice": "sometimes"}))).unwrap_err();
        assert!(e.message.contains("sometimes"), "{}", e.message);
        // "auto" without tools is simply no tools.
        let p = prep(json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"})).unwrap();
        assert!(p.tools.is_none());
    }

    #[test]
    fn assistant_tool_calls_and_tool_results_become_template_messages() {
        let p = prep(with_tools(json!({"messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 18}"},
        ]})))
        .unwrap();
        assert_eq!(p.messages.len(), 3);
        let a = &p.messages[1];
        assert_eq!(a.role, "assistant");
        assert_eq!(a.content, "");
        let calls = a.tool_calls.as_ref().unwrap();
        assert_eq!(calls[0].kind, "function");
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(calls[0].function.arguments, json!({"city": "Paris"}));
        let t = &p.messages[2];
        assert_eq!((t.role.as_str(), t.content.as_str()), ("tool", "{\"temp_c\": 18}"));
        assert_eq!(t.name.as_deref(), Some("get_weather"));
        // Arguments that are not JSON are kept as a string; empty ones are {}.
        assert_eq!(history_arguments(Some(json!("not json"))), json!("not json"));
        assert_eq!(history_arguments(Some(json!(""))), json!({}));
        let e = prep(json!({"messages": [{"role": "function", "name": "f", "content": "x"}]})).unwrap_err();
        assert!(e.message.contains("role `tool`"), "{}", e.message);
    }

    #[test]
    fn bad_schemas_and_unsupported_options_are_400s_that_say_why() {
        let bad_schema = json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}});
        let e = prep(json!({"messages": [{"role": "user", "content": "x"}], "tools": [bad_schema]})).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("tools[0]") && e.message.contains("not a valid JSON schema"), "{}", e.message);
        let e = prep(json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "retrieval", "function": {"name": "f"}}]})).unwrap_err();
        assert!(e.message.contains("\"function\""), "{}", e.message);
        let e = prep(json!({"messages": [{"role": "user", "content": "x"}], "tools": [weather_tool(), weather_tool()]})).unwrap_err();
        assert!(e.message.contains("twice"), "{}", e.message);

        let e = prep(json!({"messages": [{"role": "user", "content": "x"}], "n": 2})).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("`n`"), "{}", e.message);
        assert!(prep(json!({"messages": [{"role": "user", "content": "x"}], "n": 1})).is_ok());

        let e = prep(json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}})).unwrap_err();
        assert!(e.message.contains("json_object") && e.message.contains("not supported"), "{}", e.message);
        assert!(prep(json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "text"}})).is_ok());
        for (k, v) in [("temperature", json!(3)), ("top_p", json!(1.5)), ("max_tokens", json!(0)), ("stop", json!(5))] {
            let mut body = json!({"messages": [{"role": "user", "content": "x"}]});
            body[k] = v;
            let e = prep(body).unwrap_err();
            assert!(e.message.contains(k), "{k}: {}", e.message);
        }
    }

    #[test]
    fn model_names_stops_and_streams() {
        for m in [MODEL, "errand", "default"] {
            assert!(prep(json!({"model": m, "messages": [{"role": "user", "content": "x"}]})).is_ok(), "{m}");
        }
        let e = prep(json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})).unwrap_err();
        assert_eq!((e.status, e.code), (StatusCode::NOT_FOUND, "model_not_found"));
        assert!(e.message.contains("gpt-4o") && e.message.contains(MODEL), "{}", e.message);
        let p = prep(json!({"messages": [{"role": "user", "content": "x"}], "stop": "END", "stream": true,
            "stream_options": {"include_usage": true}, "top_p": 0})).unwrap();
        assert_eq!(p.stop, vec!["END".to_string()]);
        assert!(p.stream && p.include_usage);
        assert!(p.sampling.validate().is_ok());
        let p = prep(json!({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "", "b"]})).unwrap();
        assert_eq!(p.stop, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(p.max_tokens, DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn openai_tool_names_get_aliases_the_model_can_use() {
        let names = alias_names(&["getWeather", "get_weather", "read-file", "2fa", "ok"]);
        assert_eq!(names.model("get_weather"), "get_weather");
        assert_eq!(names.model("getWeather"), "get_weather_2");
        assert_eq!(names.model("read-file"), "read_file");
        assert_eq!(names.model("2fa"), "fn_2fa");
        assert_eq!(names.client("get_weather_2"), "getWeather");
        assert_eq!(names.client("read_file"), "read-file");
        assert_eq!(names.client("unknown"), "unknown");
        let p = prep(json!({
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "getWeather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
            "tools": [{"type": "function", "function": {"name": "getWeather", "description": "w", "parameters": {"properties": {}}}}],
        }))
        .unwrap();
        assert!(p.tools.as_ref().unwrap().get("get_weather").is_some());
        assert_eq!(p.messages[1].tool_calls.as_ref().unwrap()[0].function.name, "get_weather");
        assert_eq!(p.messages[2].name.as_deref(), Some("get_weather"));
        let mut r = ReplyBuilder::new(MODEL, &p, 0);
        let (body, _) = r.collect(vec![call("get_weather", json!({})), Event::Done(usage(FinishReason::Stop))]).unwrap();
        assert_eq!(body["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "getWeather");
    }

    #[test]
    fn a_plain_reply_and_a_tool_call_reply() {
        let p = prep(with_tools(json!({}))).unwrap();
        let mut r = ReplyBuilder::new(MODEL, &p, 0);
        let (body, u) = r
            .collect(vec![Event::Delta("Hel".into()), Event::Delta("lo".into()), Event::Done(usage(FinishReason::Length))])
            .unwrap();
        assert_eq!(u.completion_tokens, 3);
        assert_eq!(body["object"], "chat.completion");
        assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(body["model"], MODEL);
        let c = &body["choices"][0];
        assert_eq!(c["message"]["content"], "Hello");
        assert!(c["message"].get("tool_calls").is_none());
        assert_eq!(c["finish_reason"], "length");
        assert_eq!(body["usage"], json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13, "prompt_tokens_details": {"cached_tokens": 4}}));

        let mut r = ReplyBuilder::new(MODEL, &p, 0);
        let (body, _) = r
            .collect(vec![call("get_weather", json!({"city": "Paris"})), Event::Delta("\n".into()), Event::Done(usage(FinishReason::Stop))])
            .unwrap();
        let m = &body["choices"][0]["message"];
        assert!(m["content"].is_null());
        let tc = &m["tool_calls"][0];
        assert!(tc["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(tc["type"], "function");
        let args: Value = serde_json::from_str(tc["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Paris"}));
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");

        // parallel_tool_calls: false keeps the first call only.
        let p = prep(with_tools(json!({"parallel_tool_calls": false}))).unwrap();
        let mut r = ReplyBuilder::new(MODEL, &p, 0);
        let (body, _) = r
            .collect(vec![call("get_weather", json!({"city": "A"})), call("get_time", json!({})), Event::Done(usage(FinishReason::Stop))])
            .unwrap();
        assert_eq!(body["choices"][0]["message"]["tool_calls"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn engine_errors_map_to_statuses() {
        let too_long = EngineError::PromptTooLong { prompt: 40_000, context: 32_768 }.to_string();
        let e = engine_error(&too_long);
        assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, "context_length_exceeded"));
        assert!(e.message.contains("40000"), "{}", e.message);
        let e = submit_error(EngineError::PromptTooLong { prompt: 9, context: 8 });
        assert_eq!(e.code, "context_length_exceeded");
        let tmpl = EngineError::Template(crate::template::TemplateError::Render("roles must alternate".into())).to_string();
        let e = engine_error(&tmpl);
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("roles must alternate"));
        let g = EngineError::Grammar(crate::tools::grammar::GrammarError::Build("bad regex".into())).to_string();
        assert_eq!(engine_error(&g).status, StatusCode::BAD_REQUEST);
        assert_eq!(submit_error(EngineError::Busy(3)).status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(engine_error("internal error in the engine: boom").status, StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = ReplyBuilder::new(MODEL, &prep(with_tools(json!({}))).unwrap(), 0);
        assert_eq!(r.collect(vec![Event::Error(too_long)]).unwrap_err().code, "context_length_exceeded");
    }

    fn parse_chunks(data: &[String]) -> Vec<Value> {
        data.iter().filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect()
    }

    #[test]
    fn stream_chunks_in_order_with_usage_and_done() {
        let p = prep(json!({"messages": [{"role": "user", "content": "x"}], "stream": true, "stream_options": {"include_usage": true}})).unwrap();
        let mut r = ReplyBuilder::new(MODEL, &p, 0);
        let mut data = vec![r.first_chunk()];
        for ev in [Event::Delta("Hi".into()), Event::Delta("\n\n".into()), Event::Delta("there".into()), Event::Delta(" ".into())] {
            let (d, step, _) = r.stream_event(Some(ev));
            assert_eq!(step, Step::Continue);
            data.extend(d);
        }
        let (d, step, u) = r.stream_event(Some(Event::Done(usage(FinishReason::Stop))));
        assert_eq!(step, Step::Done);
        assert!(u.is_some());
        data.extend(d);
        assert_eq!(data.last().unwrap(), "[DONE]");
        let chunks = parse_chunks(&data);
        assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
        assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text, "Hi\n\nthere ", "whitespace is held, never lost, in a text reply");
        let fin = &chunks[chunks.len() - 2];
        assert_eq!(fin["choices"][0]["finish_reason"], "stop");
        assert!(fin["usage"].is_null());
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"]["total_tokens"], 13);
    }

    #[test]
    fn stream_tool_calls_and_errors() {
        let p = prep(with_tools(json!({"stream": true}))).unwrap();
        let mut r = ReplyBuilder::new(MODEL, &p, 0);
        let mut data = vec![r.first_chunk()];
        for ev in [call("get_weather", json!({"city": "Paris"})), Event::Delta("\n".into()), call("get_time", json!({}))] {
            data.extend(r.stream_event(Some(ev)).0);
        }
        data.extend(r.stream_event(Some(Event::Done(usage(FinishReason::Stop)))).0);
        let chunks = parse_chunks(&data);
        let calls: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0)).collect();
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[0]["index"].as_u64(), calls[1]["index"].as_u64()), (Some(0), Some(1)));
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(calls[0]["function"]["arguments"], "{\"city\":\"Paris\"}");
        assert!(chunks.iter().skip(1).all(|c| c["choices"][0]["delta"].get("content").is_none()), "no stray whitespace content");
        assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");
        assert!(chunks.iter().all(|c| c.get("usage").is_none()), "no usage unless asked");

        let mut r = ReplyBuilder::new(MODEL, &p, 0);
        let (d, step, _) = r.stream_event(Some(Event::Error("internal error in the engine: boom".into())));
        assert_eq!(step, Step::Failed);
        let v: Value = serde_json::from_str(&d[0]).unwrap();
        assert_eq!(v["error"]["code"], "internal");
        let (_, step, _) = r.stream_event(None);
        assert_eq!(step, Step::Failed);
    }
}
