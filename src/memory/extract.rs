//! Preferences the model reads out of ordinary messages ("by the way, I
//! can't eat peanuts"), into a fixed schema, by a grammar-constrained call.
//!
//! The model only proposes. Each proposal must be about words the person
//! actually wrote (a 0.5B model invents), its kind is one of four, and it is
//! kept with `source: "extracted"` so the person can see and forget it.

use super::keys::{self, Kind};
use crate::engine::sampler::SamplingParams;
use crate::engine::{Engine, Event, Prompt, Request};
use crate::template::Message;
use crate::tools::{Tool, ToolDef, ToolSet};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::sync::Arc;

const SYSTEM: &str = "You read one message from a user and keep what it says about the user's lasting tastes: foods or things they like, dislike or cannot have, their diet, and personal facts (home, office, family). Call save_preferences once. Each item's `about` repeats the user's own words. If the message only asks for something, call save_preferences with an empty list.";

fn tool() -> Tool {
    let def: ToolDef = serde_json::from_value(json!({
        "name": "save_preferences",
        "description": {"en": "Keep the user's lasting preferences from their message."},
        "parameters": {
            "type": "object",
            "properties": {
                "preferences": {
                    "type": "array",
                    "maxItems": 3,
                    "items": {
                        "type": "object",
                        "properties": {
                            "kind": {"type": "string", "enum": ["like", "dislike", "diet", "fact"]},
                            "about": {"type": "string", "minLength": 2, "maxLength": 80}
                        },
                        "required": ["kind", "about"],
                        "additionalProperties": false
                    }
                }
            },
            "required": ["preferences"],
            "additionalProperties": false
        }
    }))
    .expect("a valid tool definition");
    Tool::new("errand", def).expect("a valid tool")
}

/// True for messages worth asking the model about: the person talks about
/// themselves and is not (only) asking a question.
pub fn worth_reading(text: &str) -> bool {
    let t = format!(" {} ", text.to_lowercase());
    let first_person = [" i ", " i'm ", " im ", " my ", " i've ", " i'd ", "我", "저는", "제가", "나는", "내가", "전 "].iter().any(|w| t.contains(w));
    let question = text.trim_end().ends_with(['?', '？']);
    first_person && !question && text.chars().count() <= 400
}

/// What the model proposes, checked: `(kind, text, tags)`.
pub async fn extract(engine: &Engine, text: &str, lang: &str) -> Result<Vec<(Kind, String, Vec<String>)>> {
    let tools = Arc::new(ToolSet::from_tools(vec![tool()]));
    let req = Request {
        session: None,
        prompt: Prompt::Chat { messages: vec![Message::system(SYSTEM.to_owned()), Message::user(text.to_owned())], tools: Some(tools.clone()), lang: lang.to_owned() },
        max_tokens: 120,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        constrain_tools: true,
        grammar_tools: Some(tools),
        require_call: true,
        share_prefix: true,
        grammar: None,
        compiled: Default::default(),
    };
    let mut rx = engine.submit(req).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut args: Option<Value> = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::ToolCall { call, error: None } if call.name == "save_preferences" => args = Some(Value::Object(call.arguments)),
            Event::Error(e) => anyhow::bail!("the model failed: {e}"),
            _ => {}
        }
    }
    let args = args.context("the model made no call")?;
    Ok(checked(text, &args))
}

/// Keeps proposals grounded in the message: their words (or tags) appear in it.
pub fn checked(text: &str, args: &Value) -> Vec<(Kind, String, Vec<String>)> {
    let said = text.to_lowercase();
    let said_tags = keys::tags(text);
    let mut out = Vec::new();
    for p in args["preferences"].as_array().into_iter().flatten() {
        let (Some(kind), Some(about)) = (p["kind"].as_str().and_then(Kind::parse), p["about"].as_str()) else { continue };
        let about = about.trim();
        let tags: Vec<String> = keys::tags(about).into_iter().filter(|t| said_tags.contains(t)).collect();
        let words_said = about
            .to_lowercase()
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| w.chars().count() >= 4 || (!w.is_ascii() && !w.is_empty()))
            .any(|w| said.contains(w));
        let cjk_said = !about.is_ascii() && about.chars().filter(|c| !c.is_ascii()).collect::<Vec<_>>().windows(2).any(|w| said.contains(&w.iter().collect::<String>()));
        if tags.is_empty() && !words_said && !cjk_said {
            continue;
        }
        // The model's stance is a proposal too: clear words in the text win
        // ("I can't eat peanuts" is a dislike whatever it labelled it).
        let kind = keys::polarity(about).unwrap_or(kind);
        // …and the person must have taken that stance: "get me a ride to the
        // airport" holds no "I love the airport".
        if !keys::has_stance(text, kind) {
            continue;
        }
        if kind == Kind::Diet && !tags.iter().any(|t| t == "vegetarian") {
            // A diet the lexicon does not know is kept as a dislike or fact, not as a rule.
            out.push((Kind::Fact, about.to_owned(), tags));
            continue;
        }
        out.push((kind, about.to_owned(), tags));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tool_builds() {
        assert_eq!(tool().def.name, "save_preferences");
    }

    #[test]
    fn only_self_descriptions_are_read() {
        assert!(worth_reading("By the way, I can't eat peanuts"));
        assert!(worth_reading("我对花生过敏"));
        assert!(!worth_reading("get me a ride to the airport"));
        assert!(!worth_reading("Can I pay by card?"));
    }

    #[test]
    fn invented_proposals_are_dropped() {
        let text = "By the way, I can't eat peanuts and I love spicy food";
        assert_eq!(keys::polarity("I can't eat peanuts"), Some(Kind::Dislike));
        let args = json!({"preferences": [
            {"kind": "dislike", "about": "peanuts"},
            {"kind": "dislike", "about": "I love spicy food"},
            {"kind": "like", "about": "sushi"},
            {"kind": "diet", "about": "gluten-free"},
            {"kind": "nonsense", "about": "peanuts"}
        ]});
        let invented = json!({"preferences": [{"kind": "like", "about": "I love to go to the airport at 7"}]});
        assert!(checked("Get me a ride to the airport at 7, please.", &invented).is_empty(), "no stance was taken");
        let got = checked(text, &args);
        let kinds: Vec<(Kind, &str)> = got.iter().map(|(k, a, _)| (*k, a.as_str())).collect();
        assert_eq!(kinds, [(Kind::Dislike, "peanuts"), (Kind::Like, "I love spicy food")], "the words' stance beats the label");
        assert_eq!(got[1].2, ["spicy"]);
    }
}
