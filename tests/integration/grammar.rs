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

/// A grammar that forces the rest of a Korean character after the model
/// wrote its first bytes (Qwen has tokens for single bytes): only a token
/// that continues the character may follow, never U+FFFD's.
#[test]
fn forced_bytes_inside_a_character_stay_bytes() {
    let tok = Arc::new(Tokenizer::from_gguf(&GgufFile::open(&model(QWEN).path).unwrap()).unwrap());
    let f = ConstraintFactory::new(tok.clone(), 151_936).unwrap();
    let id_of = |b: &[u8]| (0..tok.vocab_size() as u32).find(|&i| tok.token_bytes(i) == b).unwrap_or_else(|| panic!("no token for {b:x?}"));
    // "블" is EB B8 94.
    let mut c = f.for_lark("start: /set place 명동 블로썸/").unwrap();
    for t in tok.encode("set place 명동", false).unwrap() {
        c.consume(t).unwrap();
    }
    c.consume(id_of(&[0x20, 0xeb])).unwrap();
    c.consume(id_of(&[0xb8])).unwrap();
    let mut logits = vec![0f32; 151_936];
    c.mask(&mut logits).unwrap();
    let replacement = id_of("\u{fffd}".as_bytes());
    assert_eq!(logits[replacement as usize], f32::NEG_INFINITY, "U+FFFD's token is allowed where byte 0x94 is forced");
    assert!(logits[id_of(&[0x94]) as usize].is_finite());
    c.consume(id_of(&[0x94])).unwrap();
    for t in tok.encode("로썸", false).unwrap() {
        c.consume(t).unwrap();
    }
    assert!(c.is_accepting());
}
