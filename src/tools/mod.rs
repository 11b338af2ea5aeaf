//! Tools: mini-program manifests, tool-call parsing, and constrained decoding.
//!
//! A mini-program declares its services in a JSON manifest under `tools/`
//! (see `tools/README.md`). Each tool has a name, a description in English,
//! Chinese and Korean, JSON-schema parameters, and whether it needs the
//! user's confirmation. Manifests are validated at load; arguments the model
//! produces are validated against the schema before anything is called.

pub mod flow;
pub mod grammar;
pub mod parse;

pub use parse::{CallStream, StreamItem, ToolCall};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("tool `{name}` is declared twice: in {first} and in {second}")]
    Duplicate {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
}

/// Text in the three languages Errand speaks; `en` is required.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Localized {
    pub en: String,
    #[serde(default)]
    pub zh: Option<String>,
    #[serde(default)]
    pub ko: Option<String>,
}

impl Localized {
    pub fn get(&self, lang: &str) -> &str {
        match lang {
            "zh" => self.zh.as_deref().unwrap_or(&self.en),
            "ko" => self.ko.as_deref().unwrap_or(&self.en),
            _ => &self.en,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    pub method: String,
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolDef {
    pub name: String,
    pub description: Localized,
    pub parameters: Value,
    /// Spends money, books or cancels: never run without the user's yes.
    #[serde(default)]
    pub confirm: bool,
    #[serde(default)]
    pub endpoint: Option<Endpoint>,
    /// How a result is shown (a card kind), for the platform layer.
    #[serde(default)]
    pub card: Option<String>,
    /// For a tool that needs confirmation: a side-effect-free endpoint taking
    /// the same arguments and answering `{summary, amount, currency}`, so the
    /// user confirms the exact order and amount before anything runs.
    #[serde(default)]
    pub quote: Option<Endpoint>,
    /// A JSON schema the endpoint's answer must satisfy.
    #[serde(default)]
    pub result: Option<Value>,
    /// What the tool does for its app ([`Role`]): how the assistant finds
    /// an app's status check, and which tools give ids to look up.
    #[serde(default)]
    pub role: Option<Role>,
    /// `order`, `status`, `cancel`: the result field that holds the order's id.
    #[serde(default)]
    pub order_id: Option<String>,
    /// `status`: the statuses after which an order no longer changes (the
    /// assistant stops following it).
    #[serde(default)]
    pub final_statuses: Vec<String>,
}

/// A tool's part in its app's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Looks things up: where real ids come from.
    Search,
    /// Prices something without buying it.
    Quote,
    /// Places (and charges for) an order.
    Order,
    /// Reads an order's current state (a `GET`).
    Status,
    /// Cancels an order.
    Cancel,
    /// Refunds an order.
    Refund,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub app: String,
    pub title: Localized,
    #[serde(default)]
    pub base_url: Option<String>,
    /// Words that show a message is for this mini-program, per language
    /// (see [`Keywords`]).
    #[serde(default)]
    pub keywords: Option<Keywords>,
    pub tools: Vec<ToolDef>,
    /// The tasks this mini-program runs as flows (`flow.rs`); an app
    /// without flows is served through plain tool calling.
    #[serde(default)]
    pub flows: Vec<flow::FlowDef>,
}

/// Words and phrases that show a message is meant for a mini-program
/// ("taxi", "打车", "택시"). The agent offers the model only the tools of the
/// mini-programs the conversation names (`src/agent/route.rs`); a small model
/// otherwise drifts to whichever tool it likes, whatever was asked.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keywords {
    #[serde(default)]
    pub en: Vec<String>,
    #[serde(default)]
    pub zh: Vec<String>,
    #[serde(default)]
    pub ko: Vec<String>,
}

impl Keywords {
    /// All languages' words, lower-cased, each checked: not blank and at
    /// most 40 characters.
    pub fn normalized(&self) -> Result<Vec<String>, String> {
        let mut out: Vec<String> = Vec::new();
        for (lang, words) in [("en", &self.en), ("zh", &self.zh), ("ko", &self.ko)] {
            for w in words {
                let k = w.trim().to_lowercase();
                if k.is_empty() {
                    return Err(format!("keywords.{lang} has a blank entry"));
                }
                if k.chars().count() > 40 {
                    return Err(format!("keywords.{lang}: `{w}` is longer than 40 characters"));
                }
                if !out.contains(&k) {
                    out.push(k);
                }
            }
        }
        Ok(out)
    }
}

/// A tool with its compiled argument validator.
pub struct Tool {
    pub def: ToolDef,
    pub app: String,
    /// The manifest's `base_url`, possibly with a `{sandbox}` placeholder.
    pub base_url: Option<String>,
    /// The app's routing words, normalized (empty: the app is always offered).
    pub keywords: Arc<Vec<String>>,
    /// The app's flows (shared by all its tools).
    pub flows: Arc<Vec<flow::Flow>>,
    validator: jsonschema::Validator,
    result_validator: Option<jsonschema::Validator>,
}

impl std::fmt::Debug for Tool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tool").field("name", &self.def.name).finish()
    }
}

impl Tool {
    pub fn new(app: &str, def: ToolDef) -> Result<Self, String> {
        if !valid_name(&def.name) {
            return Err(format!(
                "tool name `{}` must be 1-64 characters of a-z, 0-9 and _, starting with a letter",
                def.name
            ));
        }
        if def.description.en.trim().is_empty() {
            return Err(format!("tool `{}` needs an English description", def.name));
        }
        if def.parameters.get("type") != Some(&json!("object")) {
            return Err(format!(
                "tool `{}`: `parameters` must be a JSON schema with \"type\": \"object\"",
                def.name
            ));
        }
        let validator = jsonschema::validator_for(&def.parameters)
            .map_err(|e| format!("tool `{}`: `parameters` is not a valid JSON schema: {e}", def.name))?;
        let result_validator = match &def.result {
            None => None,
            Some(schema) => Some(
                jsonschema::validator_for(schema)
                    .map_err(|e| format!("tool `{}`: `result` is not a valid JSON schema: {e}", def.name))?,
            ),
        };
        for (what, ep) in [("endpoint", &def.endpoint), ("quote", &def.quote)] {
            if let Some(ep) = ep {
                check_endpoint(&def, what, ep)?;
            }
        }
        if def.confirm && def.endpoint.is_none() {
            return Err(format!("tool `{}` needs confirmation but has no `endpoint`", def.name));
        }
        if def.quote.is_some() && !def.confirm {
            return Err(format!(
                "tool `{}` has a `quote` but no `\"confirm\": true`; quotes exist only for confirmed tools",
                def.name
            ));
        }
        Ok(Self {
            def,
            app: app.into(),
            base_url: None,
            keywords: Arc::default(),
            flows: Arc::default(),
            validator,
            result_validator,
        })
    }

    /// Checks an endpoint's answer against the manifest's `result` schema.
    pub fn validate_result(&self, result: &Value) -> Result<(), String> {
        let Some(v) = &self.result_validator else { return Ok(()) };
        let errors: Vec<String> = v
            .iter_errors(result)
            .take(5)
            .map(|e| format!("{}: {e}", e.instance_path))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("`{}` returned a malformed result: {}", self.def.name, errors.join("; ")))
        }
    }

    /// Checks arguments against the schema; the error lists every problem in
    /// words the model can act on.
    pub fn validate(&self, args: &serde_json::Map<String, Value>) -> Result<(), String> {
        let v = Value::Object(args.clone());
        let errors: Vec<String> = self
            .validator
            .iter_errors(&v)
            .map(|e| {
                let at = e.instance_path.to_string();
                if at.is_empty() {
                    e.to_string()
                } else {
                    format!("{at}: {e}")
                }
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "invalid arguments for `{}`: {}",
                self.def.name,
                errors.join("; ")
            ))
        }
    }

    /// The OpenAI/Hugging Face tool object chat templates render.
    pub fn template_json(&self, lang: &str) -> Value {
        json!({
            "type": "function",
            "function": {
                "name": self.def.name,
                "description": self.def.description.get(lang),
                "parameters": self.def.parameters,
            }
        })
    }
}

/// Path parameters are `{name}` segments naming a declared parameter.
pub fn path_params(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .collect()
}

fn check_endpoint(def: &ToolDef, what: &str, ep: &Endpoint) -> Result<(), String> {
    if !matches!(ep.method.as_str(), "GET" | "POST" | "PUT" | "PATCH" | "DELETE") {
        return Err(format!(
            "tool `{}`: {what} method `{}` must be one of GET, POST, PUT, PATCH, DELETE",
            def.name, ep.method
        ));
    }
    if !ep.path.starts_with('/') {
        return Err(format!("tool `{}`: {what} path `{}` must start with /", def.name, ep.path));
    }
    let props = def.parameters.get("properties");
    for p in path_params(&ep.path) {
        if props.and_then(|x| x.get(p)).is_none() {
            return Err(format!(
                "tool `{}`: {what} path `{}` uses {{{p}}} but `{p}` is not a parameter",
                def.name, ep.path
            ));
        }
    }
    Ok(())
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && s.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Every tool from every manifest, by name.
#[derive(Debug, Default, Clone)]
pub struct ToolSet {
    tools: Vec<Arc<Tool>>,
    by_name: HashMap<String, usize>,
}

impl ToolSet {
    pub fn from_tools(tools: Vec<Tool>) -> Self {
        let mut set = Self::default();
        for t in tools {
            set.by_name.insert(t.def.name.clone(), set.tools.len());
            set.tools.push(Arc::new(t));
        }
        set
    }

    /// Loads every `*.json` manifest in `dir`, in name order.
    pub fn load_dir(dir: &Path) -> Result<Self, ManifestError> {
        let entries = std::fs::read_dir(dir).map_err(|source| ManifestError::Read {
            path: dir.to_owned(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        let mut tools = Vec::new();
        let mut origin: HashMap<String, PathBuf> = HashMap::new();
        for path in paths {
            for t in load_manifest(&path)? {
                if let Some(first) = origin.get(&t.def.name) {
                    return Err(ManifestError::Duplicate {
                        name: t.def.name.clone(),
                        first: first.clone(),
                        second: path.clone(),
                    });
                }
                origin.insert(t.def.name.clone(), path.clone());
                tools.push(t);
            }
        }
        let set = Self::from_tools(tools);
        set.check_flow_ids().map_err(|message| ManifestError::Invalid { path: dir.to_owned(), message })?;
        Ok(set)
    }

    /// Flow ids are unique across apps.
    fn check_flow_ids(&self) -> Result<(), String> {
        let mut seen: HashMap<&str, &str> = HashMap::new();
        for f in self.flows() {
            if let Some(other) = seen.insert(&f.def.id, &f.app) {
                return Err(format!("flow `{}` is declared by both `{other}` and `{}`", f.def.id, f.app));
            }
        }
        Ok(())
    }

    /// This set with `app`'s tools replaced by `tools` (all of one app).
    /// A name another app already uses is refused.
    pub fn with_app(&self, app: &str, tools: Vec<Tool>) -> Result<Self, String> {
        let mut out: Vec<Arc<Tool>> = self.tools.iter().filter(|t| t.app != app).cloned().collect();
        for t in tools {
            if t.app != app {
                return Err(format!("tool `{}` belongs to app `{}`, not `{app}`", t.def.name, t.app));
            }
            if let Some(other) = out.iter().find(|o| o.def.name == t.def.name) {
                return Err(format!("tool name `{}` is already used by app `{}`", t.def.name, other.app));
            }
            out.push(Arc::new(t));
        }
        let mut set = Self::default();
        for t in out {
            set.by_name.insert(t.def.name.clone(), set.tools.len());
            set.tools.push(t);
        }
        set.check_flow_ids()?;
        Ok(set)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Tool>> {
        self.by_name.get(name).map(|&i| &self.tools[i])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tool>> {
        self.tools.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    pub fn len(&self) -> usize {
        self.tools.len()
    }

    /// Every app's flows, in the order the apps' tools come.
    pub fn flows(&self) -> Vec<&flow::Flow> {
        let mut apps: Vec<&str> = Vec::new();
        let mut out = Vec::new();
        for t in &self.tools {
            if !apps.contains(&t.app.as_str()) {
                apps.push(&t.app);
                out.extend(t.flows.iter());
            }
        }
        out
    }

    pub fn flow(&self, id: &str) -> Option<&flow::Flow> {
        self.flows().into_iter().find(|f| f.def.id == id)
    }

    /// The tool that reads `app`'s orders (role `status`).
    pub fn status_tool(&self, app: &str) -> Option<&Arc<Tool>> {
        self.tools.iter().find(|t| t.app == app && t.def.role == Some(Role::Status))
    }

    /// The id `tool` (of `app`) gave an order: the field its manifest names
    /// (`order_id`, `ride_id`, `booking_id`, …), else that of the app's
    /// status tool, else `id`.
    pub fn order_id(&self, app: &str, tool: &str, order: &Value) -> Option<String> {
        let field = self
            .get(tool)
            .and_then(|t| t.def.order_id.clone())
            .or_else(|| self.status_tool(app).and_then(|t| t.def.order_id.clone()))
            .unwrap_or_else(|| "id".into());
        order.get(&field).and_then(Value::as_str).map(str::to_owned)
    }

    /// Whether an order of `app` in `status` no longer changes: the status
    /// tool's final statuses; with no status tool nothing can change it.
    pub fn is_final(&self, app: &str, status: &str) -> bool {
        self.status_tool(app).is_none_or(|t| t.def.final_statuses.iter().any(|f| f == status))
    }

    /// Whether `app` declares flows.
    pub fn has_flows(&self, app: &str) -> bool {
        self.tools.iter().any(|t| t.app == app && !t.flows.is_empty())
    }

    pub fn template_json(&self, lang: &str) -> Vec<Value> {
        self.tools.iter().map(|t| t.template_json(lang)).collect()
    }

    /// Checks a parsed call: the tool must exist and the arguments must fit
    /// its schema.
    pub fn check(&self, call: &ToolCall) -> Result<&Arc<Tool>, String> {
        let tool = self.get(&call.name).ok_or_else(|| {
            let known: Vec<&str> = self.tools.iter().map(|t| t.def.name.as_str()).collect();
            format!(
                "there is no tool named `{}`; the tools are: {}",
                call.name,
                known.join(", ")
            )
        })?;
        tool.validate(&call.arguments)?;
        Ok(tool)
    }
}

/// The roles' rules: one status check per app, a `GET` that names its
/// final statuses; order ids only where orders are.
fn check_roles(tools: &[ToolDef]) -> Result<(), String> {
    let statuses: Vec<&ToolDef> = tools.iter().filter(|t| t.role == Some(Role::Status)).collect();
    if statuses.len() > 1 {
        return Err(format!("tools `{}` and `{}` both have role `status`; an app has one", statuses[0].name, statuses[1].name));
    }
    for t in tools {
        let at = |m: String| format!("tool `{}`: {m}", t.name);
        if t.role == Some(Role::Status) {
            if t.endpoint.as_ref().is_none_or(|e| e.method != "GET") {
                return Err(at("role `status` needs a GET endpoint".into()));
            }
            if t.final_statuses.is_empty() {
                return Err(at("role `status` needs `final_statuses` (the statuses after which an order no longer changes)".into()));
            }
        } else if !t.final_statuses.is_empty() {
            return Err(at("`final_statuses` belongs to the tool with role `status`".into()));
        }
        if t.order_id.is_some() && !matches!(t.role, Some(Role::Order | Role::Status | Role::Cancel | Role::Refund)) {
            return Err(at("`order_id` belongs to tools with role `order`, `status`, `cancel` or `refund`".into()));
        }
    }
    Ok(())
}

pub fn load_manifest(path: &Path) -> Result<Vec<Tool>, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_manifest(&text, path)
}

/// Parses and validates a manifest's text; `origin` names it in errors
/// (a file, or an upload).
pub fn parse_manifest(text: &str, origin: &Path) -> Result<Vec<Tool>, ManifestError> {
    let path = origin;
    let invalid = |message: String| ManifestError::Invalid {
        path: path.to_owned(),
        message,
    };
    let m: Manifest = serde_json::from_str(text).map_err(|e| invalid(format!("not a valid manifest: {e}")))?;
    if m.tools.is_empty() {
        return Err(invalid("declares no tools".into()));
    }
    if let Some(b) = &m.base_url {
        if !(b.starts_with("http://") || b.starts_with("https://") || b.starts_with("{sandbox}")) {
            return Err(invalid(format!(
                "base_url `{b}` must start with http://, https:// or {{sandbox}}"
            )));
        }
    }
    let keywords = Arc::new(m.keywords.as_ref().map(Keywords::normalized).transpose().map_err(&invalid)?.unwrap_or_default());
    let mut flow_ids: Vec<&str> = Vec::new();
    for f in &m.flows {
        flow::validate(&m.app, f, &m.tools).map_err(&invalid)?;
        if flow_ids.contains(&f.id.as_str()) {
            return Err(invalid(format!("flow `{}` is declared twice", f.id)));
        }
        flow_ids.push(&f.id);
    }
    check_roles(&m.tools).map_err(&invalid)?;
    let flows = Arc::new(m.flows.iter().map(|def| flow::Flow { app: m.app.clone(), def: def.clone() }).collect::<Vec<_>>());
    m.tools
        .into_iter()
        .map(|def| {
            let mut t = Tool::new(&m.app, def).map_err(&invalid)?;
            if t.def.endpoint.is_some() && m.base_url.is_none() {
                return Err(invalid(format!("tool `{}` has an endpoint but the manifest has no base_url", t.def.name)));
            }
            t.base_url = m.base_url.clone();
            t.keywords = keywords.clone();
            t.flows = flows.clone();
            Ok(t)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(params: Value) -> Result<Tool, String> {
        Tool::new(
            "t",
            ToolDef {
                name: "ride_quote".into(),
                description: Localized {
                    en: "Quote a ride".into(),
                    zh: None,
                    ko: None,
                },
                parameters: params,
                confirm: false,
                endpoint: None,
                card: None,
                quote: None,
                result: None,
                role: None,
                order_id: None,
                final_statuses: Vec::new(),
            },
        )
    }

    #[test]
    fn arguments_are_validated_with_actionable_errors() {
        let t = tool(json!({
            "type": "object",
            "properties": {"dropoff": {"type": "string"}, "seats": {"type": "integer", "minimum": 1}},
            "required": ["dropoff"],
            "additionalProperties": false
        }))
        .unwrap();
        let ok: serde_json::Map<String, Value> = serde_json::from_value(json!({"dropoff": "PVG"})).unwrap();
        assert!(t.validate(&ok).is_ok());
        let bad: serde_json::Map<String, Value> = serde_json::from_value(json!({"seats": 0})).unwrap();
        let e = t.validate(&bad).unwrap_err();
        assert!(e.contains("dropoff") && e.contains("seats"), "{e}");
    }

    #[test]
    fn bad_manifests_are_rejected_clearly() {
        assert!(tool(json!({"type": "string"})).unwrap_err().contains("type"));
        assert!(tool(json!({"type": "object", "properties": {"a": {"type": "nonsense"}}})).is_err());
        let dir = std::env::temp_dir().join(format!("errand-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("broken.json");
        std::fs::write(&p, "{\"app\": \"x\"").unwrap();
        let e = load_manifest(&p).unwrap_err().to_string();
        assert!(e.contains("broken.json") && e.contains("not a valid manifest"), "{e}");
    }

    #[test]
    fn the_shipped_manifests_load() {
        let set = ToolSet::load_dir(&crate::source_root().join("tools")).unwrap();
        assert!(set.len() >= 3);
        let e = set
            .check(&ToolCall {
                name: "teleport".into(),
                arguments: Default::default(),
            })
            .unwrap_err();
        assert!(e.contains("no tool named"), "{e}");
    }
}
