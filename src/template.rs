//! Rendering the model's own chat template.
//!
//! The template is the Jinja text stored in the GGUF (`tokenizer.chat_template`),
//! or an override file from `prompts/templates/`. It is rendered with minijinja
//! configured the way Hugging Face's `apply_chat_template` configures Jinja2:
//! `trim_blocks` and `lstrip_blocks` on, a `tojson` filter that writes JSON the
//! way Python's `json.dumps(ensure_ascii=False)` does (", " and ": " separators,
//! keys in their given order, non-ASCII kept), and the `raise_exception` and
//! `strftime_now` helpers. Golden files rendered by Jinja2 itself
//! (`tests/fixtures/templates/`) keep the two in step.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the model has no chat template (tokenizer.chat_template); pass one with --template")]
    Missing,
    #[error("the chat template does not compile: {0}")]
    Compile(String),
    #[error("rendering the chat template failed: {0}")]
    Render(String),
}

/// One chat message, in the OpenAI/Hugging Face shape templates expect.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<TemplateToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Default::default()
        }
    }
    pub fn system(c: impl Into<String>) -> Self {
        Self::new("system", c)
    }
    pub fn user(c: impl Into<String>) -> Self {
        Self::new("user", c)
    }
    pub fn assistant(c: impl Into<String>) -> Self {
        Self::new("assistant", c)
    }
    pub fn tool(c: impl Into<String>) -> Self {
        Self::new("tool", c)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TemplateToolCall {
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: TemplateFunction,
}

fn function_type() -> String {
    "function".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TemplateFunction {
    pub name: String,
    pub arguments: serde_json::Value,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        install_hf_compat(&mut env);
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| TemplateError::Compile(format!("{e:#}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// Renders the conversation. `tools` are OpenAI-style tool objects
    /// (`{"type":"function","function":{name, description, parameters}}`).
    pub fn render(
        &self,
        messages: &[Message],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError::Render(e.to_string()))?;
        let tools = if tools.is_empty() {
            Value::from(())
        } else {
            Value::from_serialize(tools)
        };
        tmpl.render(minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| TemplateError::Render(format!("{e:#}")))
    }
}

/// Configures a minijinja environment the way Hugging Face configures Jinja2
/// for chat templates.
pub fn install_hf_compat(env: &mut Environment<'_>) {
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
}

/// Python-compatible `json.dumps(value, ensure_ascii=False, indent=…)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json: serde_json::Value = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

pub fn py_json_dumps(v: &serde_json::Value) -> String {
    let mut out = String::new();
    write_py_json(v, None, 0, &mut out);
    out
}

fn write_py_json(v: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                out.push_str(&py_float(f));
            } else {
                out.push_str(&n.to_string());
            }
        }
        J::String(s) => out.push_str(&serde_json::to_string(s).expect("string serialises")),
        J::Array(a) => {
            if a.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_py_json(x, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(o) => {
            if o.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::to_string(k).expect("string serialises"));
                out.push_str(": ");
                write_py_json(x, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
    }
}

/// Python's float repr for the common cases (`1.0`, `0.5`, `1e-05`).
fn py_float(f: f64) -> String {
    if f.is_finite() && f == f.trunc() && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        let s = format!("{f}");
        if s.contains('e') {
            s
        } else {
            let e = format!("{f:e}");
            // Python switches to exponent form below 1e-4.
            if f.abs() < 1e-4 && f != 0.0 {
                let (m, exp) = e.split_once('e').unwrap_or((&e, "0"));
                let exp: i32 = exp.parse().unwrap_or(0);
                format!("{m}e{}{:02}", if exp < 0 { "-" } else { "+" }, exp.abs())
            } else {
                s
            }
        }
    }
}

fn raise_exception(msg: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(format: String) -> Result<Value, JinjaError> {
    // Templates use this for "today's date" in system prompts. Only the
    // common directives are needed. No catalogued model's template calls
    // it (Errand puts the world's date in its own system prompt), so it
    // reads the machine's clock, which tests deny: a template that needs
    // it in a test must first be handed the world's clock.
    let now = crate::world::clock::wall_ms().div_euclid(1000);
    let (y, m, d) = crate::world::calendar::civil_from_days(now.div_euclid(86_400));
    const MONTHS: [&str; 12] = [
        "January", "February", "March", "April", "May", "June", "July", "August", "September",
        "October", "November", "December",
    ];
    let out = format
        .replace("%Y", &format!("{y:04}"))
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", MONTHS[(m - 1) as usize])
        .replace("%b", &MONTHS[(m - 1) as usize][..3]);
    Ok(Value::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tojson_matches_python_json_dumps() {
        let v = json!({"name": "打车", "n": 1, "f": 0.5, "a": [1, "x"], "o": {}, "q": "a\"b<c>&"});
        assert_eq!(
            py_json_dumps(&v),
            r#"{"name": "打车", "n": 1, "f": 0.5, "a": [1, "x"], "o": {}, "q": "a\"b<c>&"}"#
        );
        assert_eq!(py_json_dumps(&json!(2.0)), "2.0");
    }

    #[test]
    fn raise_exception_surfaces_as_error() {
        let t = ChatTemplate::new("{{ raise_exception('no tools here') }}", "", "").unwrap();
        let e = t.render(&[], &[], true).unwrap_err().to_string();
        assert!(e.contains("no tools here"), "{e}");
    }

    #[test]
    fn broken_template_is_a_compile_error() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", "", ""),
            Err(TemplateError::Compile(_))
        ));
    }
}
