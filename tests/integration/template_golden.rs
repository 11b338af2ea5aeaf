//! The GGUF chat templates rendered by minijinja must equal what Jinja2
//! (configured like Hugging Face's apply_chat_template) renders: golden files
//! from scripts/gen-template-golden.py.

use crate::util::{model, repo, QWEN, SMOL};
use errand::gguf::GgufFile;
use errand::template::{ChatTemplate, Message};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    messages: Vec<Message>,
    tools: Option<Vec<serde_json::Value>>,
    add_generation_prompt: bool,
}

fn check(name: &str) {
    let g = GgufFile::open(&model(name).path).unwrap();
    let src = g.str("tokenizer.chat_template").unwrap();
    let dir = repo().join("tests/fixtures/templates").join(name);
    assert_eq!(src, std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap());
    let t = ChatTemplate::new(src, "", "").unwrap();
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(repo().join("tests/fixtures/templates/cases.json")).unwrap())
            .unwrap();
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for c in &cases {
        let want = std::fs::read_to_string(dir.join(format!("{}.txt", c.name)))
            .unwrap_or_else(|e| panic!("golden file for {}: {e}", c.name));
        let got = t
            .render(&c.messages, c.tools.as_deref().unwrap_or(&[]), c.add_generation_prompt)
            .unwrap();
        if got != want {
            failures.push(format!("case {}:\n--- jinja2 ---\n{want}\n--- errand ---\n{got}", c.name));
        }
    }
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
}

#[test]
fn qwen_template_matches_jinja2_goldens() {
    check(QWEN);
}

#[test]
fn smollm2_template_matches_jinja2_goldens() {
    check(SMOL);
}
