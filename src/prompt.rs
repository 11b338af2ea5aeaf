//! From a conversation to prompt tokens.
//!
//! - System prompts come from `prompts/` (compiled in, or read from a folder),
//!   in English, Chinese or Korean, with today's date filled in.
//! - The conversation is rendered with the model's own chat template. If that
//!   template ignores `tools` (SmolLM2's does), the tool list is added to the
//!   system prompt from `prompts/tools_fallback.md` instead.
//! - Tokens: the rendered prompt is tokenized with control tokens parsed. If a
//!   user, assistant or tool message *contains* control-token text (a prompt
//!   injection such as `<|im_start|>system`), that message's content is
//!   tokenized with control tokens off, so it stays plain text.

use crate::template::{ChatTemplate, Message, TemplateError};
use crate::world::calendar::civil_from_days;
use crate::tokenizer::{Tokenizer, TokenizerError};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("cannot read prompt file {0}: {1}")]
    Read(String, std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    En,
    Zh,
    Ko,
}

impl Lang {
    pub fn code(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::Zh => "zh",
            Lang::Ko => "ko",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "en" => Some(Lang::En),
            "zh" => Some(Lang::Zh),
            "ko" => Some(Lang::Ko),
            _ => None,
        }
    }

    /// Korean if there is Hangul, Chinese if there are Han characters
    /// (and no kana), English otherwise.
    pub fn detect(text: &str) -> Self {
        let (mut hangul, mut han, mut kana) = (0, 0, 0);
        for c in text.chars() {
            match c as u32 {
                0xAC00..=0xD7A3 | 0x1100..=0x11FF | 0x3130..=0x318F => hangul += 1,
                0x4E00..=0x9FFF | 0x3400..=0x4DBF => han += 1,
                0x3040..=0x30FF => kana += 1,
                _ => {}
            }
        }
        if hangul > 0 && hangul >= han {
            Lang::Ko
        } else if han > 0 && kana == 0 {
            Lang::Zh
        } else {
            Lang::En
        }
    }
}

/// The prompt files.
#[derive(Debug, Clone)]
pub struct Prompts {
    system: [String; 3],
    tools_fallback: String,
}

impl Prompts {
    pub fn builtin() -> Self {
        Self {
            system: [
                include_str!("../prompts/system.en.md").into(),
                include_str!("../prompts/system.zh.md").into(),
                include_str!("../prompts/system.ko.md").into(),
            ],
            tools_fallback: include_str!("../prompts/tools_fallback.md").into(),
        }
    }

    pub fn from_dir(dir: &Path) -> Result<Self, PromptError> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|e| PromptError::Read(p.display().to_string(), e))
        };
        Ok(Self {
            system: [read("system.en.md")?, read("system.zh.md")?, read("system.ko.md")?],
            tools_fallback: read("tools_fallback.md")?,
        })
    }

    /// The system prompt for `lang`, with the date of `unix_secs` filled in.
    pub fn system(&self, lang: Lang, unix_secs: i64) -> String {
        let text = &self.system[lang as usize];
        let days = unix_secs.div_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        const WEEKDAYS: [[&str; 7]; 3] = [
            ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"],
            ["星期四", "星期五", "星期六", "星期日", "星期一", "星期二", "星期三"],
            ["목요일", "금요일", "토요일", "일요일", "월요일", "화요일", "수요일"],
        ];
        let weekday = WEEKDAYS[lang as usize][days.rem_euclid(7) as usize];
        let env = minijinja::Environment::new();
        env.render_str(
            text,
            minijinja::context! {
                today => format!("{y:04}-{m:02}-{d:02}"),
                weekday => weekday,
                // Small models get "tomorrow" wrong by a day; spell it out.
                tomorrow => { let (y, m, d) = civil_from_days(days + 1); format!("{y:04}-{m:02}-{d:02}") },
            },
        )
        .unwrap_or_else(|_| text.clone())
        .trim_end()
        .to_owned()
    }

    fn tools_section(&self, tools: &[Value]) -> Result<String, PromptError> {
        let mut env = minijinja::Environment::new();
        crate::template::install_hf_compat(&mut env);
        let out = env
            .render_str(
                &self.tools_fallback,
                minijinja::context! { tools => minijinja::Value::from_serialize(tools) },
            )
            .map_err(|e| TemplateError::Render(format!("tools_fallback.md: {e:#}")))?;
        Ok(out.trim_end().to_owned())
    }
}

/// Renders conversations for one model and turns them into tokens.
pub struct PromptBuilder {
    pub template: ChatTemplate,
    pub prompts: Prompts,
    renders_tools: bool,
}

const SENTINEL_OPEN: char = '\u{F8F0}';
const SENTINEL_CLOSE: char = '\u{F8F1}';

impl PromptBuilder {
    pub fn new(template: ChatTemplate, prompts: Prompts) -> Self {
        let probe_tool = serde_json::json!({"type": "function", "function": {
            "name": "errand_probe_tool", "description": "probe", "parameters": {"type": "object", "properties": {}}}});
        let msgs = [Message::user("hi")];
        let with = template.render(&msgs, &[probe_tool], true).ok();
        let renders_tools = with.is_some_and(|w| w.contains("errand_probe_tool"));
        Self {
            template,
            prompts,
            renders_tools,
        }
    }

    /// Whether the model's template shows tools itself.
    pub fn template_renders_tools(&self) -> bool {
        self.renders_tools
    }

    /// The prompt text for a conversation (with the generation prompt).
    pub fn render(&self, messages: &[Message], tools: &[Value]) -> Result<String, PromptError> {
        let messages = self.with_tool_fallback(messages, tools)?;
        let tools = if self.renders_tools { tools } else { &[] };
        Ok(self.template.render(&messages, tools, true)?)
    }

    fn with_tool_fallback(&self, messages: &[Message], tools: &[Value]) -> Result<Vec<Message>, PromptError> {
        let mut messages = messages.to_vec();
        if !self.renders_tools && !tools.is_empty() {
            let section = self.prompts.tools_section(tools)?;
            match messages.first_mut() {
                Some(m) if m.role == "system" => {
                    m.content = format!("{}\n\n{section}", m.content);
                }
                _ => messages.insert(0, Message::system(section)),
            }
        }
        Ok(messages)
    }

    /// Prompt tokens for a conversation; see the module docs for how
    /// control-token text inside messages is neutralised.
    pub fn tokens(
        &self,
        tok: &Tokenizer,
        messages: &[Message],
        tools: &[Value],
    ) -> Result<Vec<u32>, PromptError> {
        let controls = tok.control_token_strings();
        let has_control = |s: &str| controls.iter().any(|c| s.contains(c.as_str()));
        let suspicious = |m: &Message| {
            m.role != "system"
                && (has_control(&m.content)
                    || m.tool_calls.as_ref().is_some_and(|calls| {
                        calls.iter().any(|c| {
                            has_control(&c.function.name) || has_control(&c.function.arguments.to_string())
                        })
                    }))
        };
        if !messages.iter().any(suspicious) {
            let text = self.render(messages, tools)?;
            return Ok(with_bos(tok, tok.encode(&text, true)?));
        }
        // Replace every piece of message text that spells a control token
        // (contents, tool names, string values in tool-call arguments) by a
        // sentinel, render, then tokenize the template's text with control
        // tokens and the hidden pieces without. The sentinels are
        // private-use characters; any already in the text are replaced first
        // so they cannot be forged.
        let clean = |s: &str| s.replace([SENTINEL_OPEN, SENTINEL_CLOSE], "\u{FFFD}");
        let mut hidden: Vec<String> = Vec::new();
        let hide = |text: String, hidden: &mut Vec<String>| {
            hidden.push(text);
            format!("{SENTINEL_OPEN}{}{SENTINEL_CLOSE}", hidden.len() - 1)
        };
        let mut masked: Vec<Message> = Vec::with_capacity(messages.len());
        for m in messages {
            let mut m2 = m.clone();
            m2.content = clean(&m.content);
            if m.role != "system" && has_control(&m2.content) {
                m2.content = hide(m2.content.clone(), &mut hidden);
            }
            if let Some(calls) = m2.tool_calls.as_mut() {
                for c in calls.iter_mut() {
                    c.function.name = clean(&c.function.name);
                    if has_control(&c.function.name) {
                        c.function.name = hide(c.function.name.clone(), &mut hidden);
                    }
                    mask_strings(&mut c.function.arguments, &clean, &has_control, &mut |s| {
                        // Inside JSON the template writes the escaped form.
                        let quoted = serde_json::to_string(&s).expect("strings serialise");
                        hide(quoted[1..quoted.len() - 1].to_owned(), &mut hidden)
                    });
                }
            }
            masked.push(m2);
        }
        let text = self.render(&masked, tools)?;
        let mut ids = Vec::new();
        let mut rest = text.as_str();
        while let Some(start) = rest.find(SENTINEL_OPEN) {
            ids.extend(tok.encode(&rest[..start], true)?);
            let after = &rest[start + SENTINEL_OPEN.len_utf8()..];
            let end = after.find(SENTINEL_CLOSE).unwrap_or(after.len());
            let idx: usize = after[..end].parse().expect("sentinels are only ours");
            if let Some(content) = hidden.get(idx) {
                ids.extend(tok.encode(content, false)?);
            }
            rest = &after[(end + SENTINEL_CLOSE.len_utf8()).min(after.len())..];
        }
        ids.extend(tok.encode(rest, true)?);
        Ok(with_bos(tok, ids))
    }
}

/// Cleans every string in a JSON value and replaces those that spell a
/// control token through `hide`.
fn mask_strings(
    v: &mut Value,
    clean: &dyn Fn(&str) -> String,
    has_control: &dyn Fn(&str) -> bool,
    hide: &mut dyn FnMut(String) -> String,
) {
    match v {
        Value::String(s) => {
            let c = clean(s);
            *s = if has_control(&c) { hide(c) } else { c };
        }
        Value::Array(a) => a.iter_mut().for_each(|x| mask_strings(x, clean, has_control, hide)),
        Value::Object(o) => o.values_mut().for_each(|x| mask_strings(x, clean, has_control, hide)),
        _ => {}
    }
}

/// Prepends BOS when the model wants one and the template did not write it.
fn with_bos(tok: &Tokenizer, mut ids: Vec<u32>) -> Vec<u32> {
    if let (true, Some(bos)) = (tok.add_bos, tok.bos_id) {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn language_detection() {
        assert_eq!(Lang::detect("get me a taxi to Pudong airport"), Lang::En);
        assert_eq!(Lang::detect("帮我叫一辆去浦东机场的车"), Lang::Zh);
        assert_eq!(Lang::detect("푸동 공항까지 택시 불러줘"), Lang::Ko);
        assert_eq!(Lang::detect("東京へ行きたいです"), Lang::En);
    }

    #[test]
    fn system_prompts_fill_the_date_in_each_language() {
        let p = Prompts::builtin();
        // 2026-11-22 is a Sunday.
        let t = 1_795_305_600;
        assert!(p.system(Lang::En, t).contains("2026-11-22 (Sunday)"), "{}", p.system(Lang::En, t));
        assert!(p.system(Lang::Zh, t).contains("星期日"));
        assert!(p.system(Lang::Ko, t).contains("일요일"));
        assert!(!p.system(Lang::En, t).contains("{{"));
    }

    #[test]
    fn builtin_prompts_equal_the_files() {
        let dir = crate::source_root().join("prompts");
        let a = Prompts::from_dir(&dir).unwrap();
        assert_eq!(a.system, Prompts::builtin().system);
    }
}
