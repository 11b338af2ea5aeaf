//! The llguidance constraint on the real Qwen vocabulary: text and valid
//! calls pass, calls hidden in text and calls that break the schema do not.

use crate::util::{model, repo, QWEN};
use errand::gguf::GgufFile;
use errand::tokenizer::Tokenizer;
use errand::tools::grammar::ConstraintFactory;
use errand::tools::ToolSet;
use std::sync::Arc;

fn accepts(f: &ConstraintFactory, tools: &ToolSet, tok: &Tokenizer, text: &str) -> bool {
    let mut c = f.for_tools(tools, false).unwrap();
    for t in tok.encode(text, true).unwrap() {
        if c.consume(t).is_err() {
            return false;
        }
    }
    c.is_accepting()
}

#[test]
fn constraint_admits_text_and_valid_calls_only() {
    let tok = Arc::new(Tokenizer::from_gguf(&GgufFile::open(&model(QWEN).path).unwrap()).unwrap());
    let tools = ToolSet::load_dir(&repo().join("tools")).unwrap();
    let f = ConstraintFactory::new(tok.clone(), 151_936).unwrap();
    let ok = |s: &str| accepts(&f, &tools, &tok, s);
    assert!(ok("The capital of France is Paris. A < B is fine."));
    assert!(ok("<tool_call>\n{\"name\": \"ride_quote\", \"arguments\": {\"dropoff\": \"Pudong airport\"}}\n</tool_call>"));
    assert!(ok("<tool_call>\n{\"name\": \"ride_quote\", \"arguments\": {\"dropoff\": \"A\"}}\n</tool_call>\n"));
    assert!(ok("```json\n{\"name\": \"food_search_restaurants\", \"arguments\": {\"dish\": \"hot pot\"}}\n```"));
    assert!(ok("{\"name\": \"food_search_restaurants\", \"arguments\": {\"dish\": \"dumplings\"}}"));
    // Calls that break the schema.
    assert!(!ok("{\"name\": \"ride_quote\", \"arguments\": {}}"), "missing required dropoff");
    assert!(!ok("{\"name\": \"teleport\", \"arguments\": {}}"), "unknown tool");
    assert!(!ok("{\"name\": \"ride_quote\", \"arguments\": {\"dropoff\": \"A\", \"vehicle_class\": \"rocket\"}}"));
    // Calls smuggled into text.
    assert!(!ok("Sure!<tool_call>{\"name\": \"ride_quote\", \"arguments\": {}}</tool_call>"));
    assert!(!ok("Sure!\n```json\n{\"name\": \"ride_quote\", \"arguments\": {}}\n```"));
}
