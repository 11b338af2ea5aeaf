//! Which mini-programs a conversation is about.
//!
//! The default model picks tools by position as much as by meaning: with all
//! six mini-programs offered, it called `bike_find` for "find vegetarian
//! delivery near Jing'an Temple" and for "what's the weather", in 81 of 219
//! logged evaluation runs outside the bike domain (README, Evaluation). So
//! each manifest names the words that mean its service (`keywords`, per
//! language), and the grammar offers only the tools of the mini-programs the
//! person's latest message names. A message that names none ("One vegan
//! mapo tofu to 1686 Nanjing West Road") keeps the conversation's current
//! focus; a conversation that never named one is offered every tool.
//! Mini-programs without keywords are always offered: they cannot be routed,
//! so they are never hidden.
//!
//! Only the person's own words move the focus, never tool results, so text
//! inside a result cannot steer the model to another mini-program's tools.

use crate::tools::ToolSet;

/// Whether `text` (already lower-cased) contains `word` (lower-cased). A word
/// in Latin script must be a whole word of the text, or the word plus a
/// plural "s"/"es" ("bikes" holds "bike", "cabbage" holds no "cab"); other
/// scripts (Chinese, Korean) have no such boundaries and match anywhere.
pub fn mentions(text: &str, word: &str) -> bool {
    let (Some(first), Some(last)) = (word.chars().next(), word.chars().next_back()) else { return false };
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !first.is_ascii_alphanumeric() && !last.is_ascii_alphanumeric() {
        return text.contains(word);
    }
    text.match_indices(word).any(|(i, _)| {
        let before_ok = !first.is_ascii_alphanumeric() || !alnum(text[..i].chars().next_back());
        let rest = &text[i + word.len()..];
        let end = rest.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(rest.len());
        let after_ok = !last.is_ascii_alphanumeric() || matches!(&rest[..end], "" | "s" | "es");
        before_ok && after_ok
    })
}

/// The apps whose keywords `text` mentions, in the tool set's order.
pub fn apps_named(tools: &ToolSet, text: &str) -> Vec<String> {
    // A place's name is no request: 虹桥火车站 names a station, not a train.
    let mut lower = text.to_lowercase();
    for p in crate::dialogue::value::places_in(text) {
        lower = lower.replace(&p.to_lowercase(), " ");
    }
    let mut out: Vec<String> = Vec::new();
    for t in tools.iter() {
        if out.contains(&t.app) {
            continue;
        }
        if t.keywords.iter().any(|k| mentions(&lower, k)) {
            out.push(t.app.clone());
        }
    }
    out
}

/// Whether a tool of `app` (with `keywords`) is offered under `focus`.
pub fn offered(focus: &[String], app: &str, keywords: &[String]) -> bool {
    focus.is_empty() || keywords.is_empty() || focus.iter().any(|f| f == app)
}

/// The focus after a message: the apps it names, or the old focus when it
/// names none.
pub fn next_focus(tools: &ToolSet, old: &[String], text: &str) -> Vec<String> {
    let named = apps_named(tools, text);
    if named.is_empty() {
        old.to_vec()
    } else {
        named
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::parse_manifest;
    use std::path::Path;

    fn app(name: &str, keywords: &str) -> Vec<crate::tools::Tool> {
        let text = format!(
            r#"{{"app": "{name}", "title": {{"en": "{name}"}}, "keywords": {keywords},
                "tools": [{{"name": "{name}_find", "description": {{"en": "find"}},
                            "parameters": {{"type": "object", "properties": {{}}}}}}]}}"#
        );
        parse_manifest(&text, Path::new("test.json")).unwrap()
    }

    fn set() -> ToolSet {
        let mut tools = app("bike", r#"{"en": ["bike", "bicycle"], "zh": ["单车"], "ko": ["자전거"]}"#);
        tools.extend(app("food", r#"{"en": ["Restaurant", "dinner"], "zh": ["外卖"], "ko": ["배달 음식"]}"#));
        tools.extend(app("mart", r#"{"en": ["cabbage"]}"#));
        tools.extend(app("ride", r#"{"en": ["cab", "taxi"]}"#));
        tools.extend(app("weather", "null"));
        ToolSet::from_tools(tools)
    }

    #[test]
    fn words_start_words_in_latin_script_and_match_anywhere_in_cjk() {
        assert!(mentions("two bikes please", "bike"));
        assert!(mentions("bike", "bike"));
        assert!(mentions("(bike)", "bike"));
        assert!(mentions("ktx표 두 장", "ktx"));
        assert!(mentions("two buses", "bus"));
        assert!(!mentions("training", "train"));
        assert!(!mentions("motorbike", "bike"));
        assert!(!mentions("a cabbage", "cab"));
        assert!(mentions("a cab, now", "cab"));
        assert!(mentions("帮我叫个单车", "单车"));
        assert!(mentions("자전거를 빌려줘", "자전거"));
        assert!(!mentions("anything", ""));
    }

    #[test]
    fn a_message_names_its_apps_in_any_language_and_case() {
        let t = set();
        assert_eq!(apps_named(&t, "Find a RESTAURANT near Jing'an Temple"), ["food"]);
        assert_eq!(apps_named(&t, "点个外卖"), ["food"]);
        assert_eq!(apps_named(&t, "배달 음식 시켜 줘"), ["food"]);
        assert_eq!(apps_named(&t, "dinner, then a taxi home"), ["food", "ride"]);
        assert_eq!(apps_named(&t, "buy a cabbage"), ["mart"]);
        assert!(apps_named(&t, "what's the weather like?").is_empty());
    }

    #[test]
    fn a_place_name_names_no_app() {
        let t = crate::tools::ToolSet::load_dir(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tools"))).unwrap();
        // 火车 is a train word, but 虹桥火车站 is only where to deliver.
        assert!(!apps_named(&t, "那就送到虹桥火车站附近吧，地址是申虹路88号。").contains(&"tickets".to_string()));
        assert!(apps_named(&t, "从虹桥火车站坐高铁去杭州").contains(&"tickets".to_string()));
    }

    #[test]
    fn the_focus_moves_only_when_a_message_names_an_app() {
        let t = set();
        let f = next_focus(&t, &[], "Find vegetarian restaurants near Jing'an Temple");
        assert_eq!(f, ["food"]);
        let f = next_focus(&t, &f, "Lotus Vegetarian. One mapo tofu to 1686 Nanjing West Road.");
        assert_eq!(f, ["food"]);
        let f = next_focus(&t, &f, "Actually, just get me a taxi");
        assert_eq!(f, ["ride"]);
        assert!(next_focus(&t, &[], "hello").is_empty());
    }

    #[test]
    fn focus_hides_other_routed_apps_but_never_unrouted_ones() {
        let t = set();
        let focus = vec!["food".to_owned()];
        let shown: Vec<&str> = t.iter().filter(|x| offered(&focus, &x.app, &x.keywords)).map(|x| x.def.name.as_str()).collect();
        assert_eq!(shown, ["food_find", "weather_find"]);
        let all: Vec<&str> = t.iter().filter(|x| offered(&[], &x.app, &x.keywords)).map(|x| x.def.name.as_str()).collect();
        assert_eq!(all.len(), 5);
    }

    #[test]
    fn bad_keywords_are_refused_with_the_field() {
        let bad = r#"{"app": "x", "title": {"en": "x"}, "keywords": {"zh": ["  "]},
                      "tools": [{"name": "x_find", "description": {"en": "find"},
                                 "parameters": {"type": "object", "properties": {}}}]}"#;
        let e = parse_manifest(bad, Path::new("x.json")).unwrap_err().to_string();
        assert!(e.contains("keywords.zh has a blank entry"), "{e}");
        let unknown = bad.replace(r#""zh": ["  "]"#, r#""fr": ["vélo"]"#);
        let e = parse_manifest(&unknown, Path::new("x.json")).unwrap_err().to_string();
        assert!(e.contains("fr"), "{e}");
    }

    #[test]
    fn every_shipped_manifest_routes_its_own_title() {
        // The built-in mini-programs each declare keywords in all three
        // languages, and each is named by its own title's words.
        let t = ToolSet::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tools")).unwrap();
        let texts = [
            ("food", ["order food delivery", "帮我点外卖", "음식 배달 시켜 줘"]),
            ("ride", ["get me a taxi", "帮我打车", "택시 불러 줘"]),
            ("bike", ["unlock a bike", "扫一辆共享单车", "자전거 빌려 줘"]),
            ("tickets", ["two train tickets", "买两张火车票", "기차표 두 장"]),
            ("salon", ["book a haircut", "预约理发", "미용실 예약"]),
            ("mart", ["buy groceries", "去超市买水果", "마트에서 과일 사 줘"]),
        ];
        for (app, msgs) in texts {
            for m in msgs {
                assert!(apps_named(&t, m).contains(&app.to_owned()), "{m:?} should name {app}, named {:?}", apps_named(&t, m));
            }
        }
        for t in t.iter() {
            assert!(!t.keywords.is_empty(), "{} has no keywords", t.app);
        }
    }
}
