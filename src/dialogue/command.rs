//! Commands: what the language model makes of one message.
//!
//! The model never calls a tool. It reads the message with a short prompt
//! (the candidate flows, the active flow's slots, the options on screen and
//! the last exchange) and writes a few lines such as
//!
//! ```text
//! start order_food
//! set place People's Square
//! set dish kung pao chicken
//! ```
//!
//! under a grammar that allows only the flows, slots and values valid in
//! this state. The executor checks every value against the person's words
//! before it uses it.

use serde::Serialize;

/// One command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Begin a flow (on top of the active one: an interruption).
    Start { flow: String },
    /// The person gave a value for a slot (a correction when it was filled).
    Set { slot: String, value: String },
    /// The person chose option N (from 1) of the options on screen.
    Pick { n: usize },
    /// Stop the active flow.
    Cancel,
    /// The message could mean any of these flows: ask which.
    Clarify { flows: Vec<String> },
    /// Small talk or a question that starts no task: the model answers.
    Chat,
    /// Nothing the assistant can do.
    CannotHandle,
}

/// Most commands one message gives.
pub const MAX_COMMANDS: usize = 8;

/// Reads the model's lines; lines that are no command are skipped (the
/// grammar makes them rare), as are repeats.
pub fn parse(text: &str) -> Vec<Command> {
    let mut out: Vec<Command> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let (head, rest) = line.split_once(' ').map(|(a, b)| (a, b.trim())).unwrap_or((line, ""));
        let c = match head {
            "start" if !rest.is_empty() => Command::Start { flow: rest.to_owned() },
            "set" => match rest.split_once(' ') {
                Some((slot, value)) if !value.trim().is_empty() => Command::Set { slot: slot.to_owned(), value: value.trim().to_owned() },
                _ => continue,
            },
            "pick" => match rest.parse::<usize>() {
                Ok(n) if n >= 1 => Command::Pick { n },
                _ => continue,
            },
            "cancel" => Command::Cancel,
            "clarify" => Command::Clarify { flows: rest.split_whitespace().map(str::to_owned).collect() },
            "chat" => Command::Chat,
            "none" => Command::CannotHandle,
            _ => continue,
        };
        if !out.contains(&c) {
            out.push(c);
        }
        if out.len() == MAX_COMMANDS {
            break;
        }
    }
    out
}

/// A slot the grammar may set, and what its value may look like.
#[derive(Debug, Clone)]
pub struct SlotRule {
    pub name: String,
    /// Fixed values (an enum), else free text.
    pub values: Option<Vec<String>>,
    /// Digits only (a count).
    pub digits: bool,
    /// The stretches this slot's value may be, when not those of the
    /// whole message ([`Allowed::spans`]): an address takes the address
    /// the words give, the other slots what lies outside it.
    pub spans: Option<Vec<String>>,
}

/// What the grammar allows in this state.
#[derive(Debug, Clone, Default)]
pub struct Allowed {
    /// Flows that may be started.
    pub flows: Vec<String>,
    pub slots: Vec<SlotRule>,
    /// Options on screen (0: no `pick`).
    pub options: usize,
    /// `cancel` allowed: a flow runs and the words ask to stop.
    pub active: bool,
    /// What a free value may be: the stretches of the message ([`spans`]).
    /// Empty: any short text.
    pub spans: Vec<String>,
    /// A flow runs: the message is about it or is chat, so `none` (no task
    /// can do this) is not offered.
    pub busy: bool,
}

/// Longest span, in characters.
const SPAN_CHARS: usize = 40;
/// Longest span of Chinese, Japanese or Korean characters.
const SPAN_CJK: usize = 16;

fn cjk(c: char) -> bool {
    matches!(c as u32, 0x3040..=0x30ff | 0x3400..=0x4dbf | 0x4e00..=0x9fff | 0xac00..=0xd7af | 0xf900..=0xfaff)
}

/// The stretches of a message a slot value may be: a value is always the
/// person's own words, so the grammar lets the model copy, not write.
///
/// A stretch starts at a word (or at any Chinese, Japanese or Korean
/// character: there words run together, and Korean particles stick to the
/// word before them) and ends at a word's end (or, again, after any such
/// character), without the punctuation around it.
pub fn spans(message: &str) -> Vec<String> {
    let chars: Vec<char> = message.chars().filter(|c| *c != '\n').collect();
    let edge = |c: char| c.is_whitespace() || (c.is_ascii_punctuation() && !"'&-#/".contains(c)) || "，。！？、；：“”‘’（）《》「」".contains(c);
    let starts_at = |i: usize| !edge(chars[i]) && (i == 0 || edge(chars[i - 1]) || cjk(chars[i]) || cjk(chars[i - 1]));
    let ends_at = |j: usize| !edge(chars[j]) && (j + 1 == chars.len() || edge(chars[j + 1]) || cjk(chars[j]) || cjk(chars[j + 1]));
    let mut out: Vec<String> = Vec::new();
    for i in (0..chars.len()).filter(|&i| starts_at(i)) {
        for j in i..chars.len().min(i + SPAN_CHARS) {
            if !ends_at(j) {
                continue;
            }
            let s: String = chars[i..=j].iter().collect();
            if s.chars().filter(|c| cjk(*c)).count() > SPAN_CJK {
                break;
            }
            if !out.contains(&s) {
                out.push(s);
            }
        }
    }
    out
}

/// Escapes text for a Lark regular expression between slashes.
fn escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$/\"-".contains(c) {
            out.push('\\');
        }
        if c == '\n' {
            continue;
        }
        out.push(c);
    }
    out
}

/// The Lark grammar of one reply: one to [`MAX_COMMANDS`] lines, each a
/// command this state allows.
pub fn grammar(a: &Allowed) -> String {
    let mut alts: Vec<String> = vec!["chat".into()];
    if !a.busy {
        alts.push("none".into());
    }
    if !a.flows.is_empty() {
        let f: Vec<String> = a.flows.iter().map(|f| escape(f)).collect();
        alts.push(format!("start ({})", f.join("|")));
        if a.flows.len() >= 2 {
            alts.push(format!("clarify ({0}) ({0})", f.join("|")));
        }
    }
    // Free values: the message's own stretches, written once for all the
    // slots that take the same ones.
    let mut free: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    for s in &a.slots {
        let value = match (&s.values, s.digits) {
            (Some(v), _) if !v.is_empty() => format!("({})", v.iter().map(|x| escape(x)).collect::<Vec<_>>().join("|")),
            (_, true) => "[1-9][0-9]?".to_owned(),
            _ => {
                let spans = s.spans.clone().unwrap_or_else(|| a.spans.clone());
                match free.iter_mut().find(|(sp, _)| *sp == spans) {
                    Some((_, names)) => names.push(escape(&s.name)),
                    None => free.push((spans, vec![escape(&s.name)])),
                }
                continue;
            }
        };
        alts.push(format!("set {} {value}", escape(&s.name)));
    }
    for (spans, names) in &free {
        let value = if spans.is_empty() { "[^\\n ][^\\n]{0,59}".to_owned() } else { format!("({})", spans.iter().map(|x| escape(x)).collect::<Vec<_>>().join("|")) };
        alts.push(format!("set ({}) {value}", names.join("|")));
    }
    if a.options > 0 {
        let n = a.options.min(20);
        let picks: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
        alts.push(format!("pick ({})", picks.join("|")));
    }
    if a.active {
        alts.push("cancel".into());
    }
    let mut start = "LINE".to_owned();
    for _ in 1..MAX_COMMANDS {
        start.push_str(" (\"\\n\" LINE)?");
    }
    format!("start: {start}\nLINE: /({})/\n", alts.join("|"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(lark: &str, text: &str) -> Option<bool> {
        crate::tools::grammar::run_bytes(lark, text).unwrap()
    }

    fn allowed() -> Allowed {
        Allowed {
            flows: vec!["order_food".into(), "book_ride".into()],
            slots: vec![
                SlotRule { name: "place".into(), values: None, digits: false, spans: None },
                SlotRule { name: "quantity".into(), values: None, digits: true, spans: None },
                SlotRule { name: "vehicle_class".into(), values: Some(vec!["economy".into(), "comfort".into()]), digits: false, spans: None },
            ],
            options: 3,
            active: true,
            spans: Vec::new(),
            busy: false,
        }
    }

    #[test]
    fn the_grammar_allows_only_this_states_commands() {
        let g = grammar(&allowed());
        assert_eq!(run(&g, "start order_food\nset place People's Square\nset quantity 3"), Some(true));
        assert_eq!(run(&g, "pick 2"), Some(true));
        assert_eq!(run(&g, "set vehicle_class comfort"), Some(true));
        assert_eq!(run(&g, "cancel"), Some(true));
        assert_eq!(run(&g, "clarify order_food book_ride"), Some(true));
        // Unknown flows, slots, values, options beyond the list: refused where they go wrong.
        assert_eq!(run(&g, "start teleport"), None);
        assert_eq!(run(&g, "set colour red"), None);
        assert_eq!(run(&g, "set vehicle_class limo"), None);
        assert_eq!(run(&g, "pick 4"), None);
        assert_eq!(run(&g, "set quantity three"), None);
        assert_eq!(run(&g, "I will order food"), None);
        // Nothing active: no cancel; no options: no pick.
        let g = grammar(&Allowed { active: false, options: 0, ..allowed() });
        assert_eq!(run(&g, "cancel"), None);
        assert_eq!(run(&g, "pick 1"), None);
        assert_eq!(run(&g, "chat"), Some(true));
        assert_eq!(run(&g, "none"), Some(true));
        // While a flow runs, a message is about it or is chat.
        let g = grammar(&Allowed { busy: true, ..allowed() });
        assert_eq!(run(&g, "none"), None);
        assert_eq!(run(&g, "chat"), Some(true));
    }

    #[test]
    fn enum_values_are_escaped() {
        let a = Allowed { slots: vec![SlotRule { name: "seat".into(), values: Some(vec!["1st (window)".into(), "a/b".into()]), digits: false, spans: None }], ..Default::default() };
        let g = grammar(&a);
        assert_eq!(run(&g, "set seat 1st (window)"), Some(true));
        assert_eq!(run(&g, "set seat a/b"), Some(true));
        assert_eq!(run(&g, "set seat 1st"), Some(false));
    }

    #[test]
    fn free_values_are_stretches_of_the_message() {
        let sp = spans("Order two kung pao chicken, to 200 Renmin Road.");
        for s in ["Order", "kung pao chicken", "200 Renmin Road", "two kung pao chicken"] {
            assert!(sp.contains(&s.to_owned()), "{s}: {sp:?}");
        }
        // Not mid-word, and not with the punctuation around it.
        assert!(!sp.iter().any(|s| s == "ung pao" || s.ends_with(',') || s.ends_with('.')), "{sp:?}");
        // Chinese runs together; Korean particles stick to their word.
        let sp = spans("帮我在静安寺附近点两份小笼包");
        assert!(sp.contains(&"静安寺".to_owned()) && sp.contains(&"小笼包".to_owned()), "{sp:?}");
        let sp = spans("테헤란로 152로 보내 줘");
        assert!(sp.contains(&"테헤란로 152".to_owned()) && sp.contains(&"테헤란로".to_owned()), "{sp:?}");
        let g = grammar(&Allowed { spans: spans("to 200 Renmin Road, please"), ..allowed() });
        assert_eq!(run(&g, "set place 200 Renmin Road"), Some(true));
        // Words the person did not say cannot be written.
        assert_eq!(run(&g, "set place 8 Julu Road"), None);
        assert_eq!(run(&g, "set place People's Square"), None);
        // Enum values and counts keep their own rules.
        assert_eq!(run(&g, "set vehicle_class comfort\nset quantity 2"), Some(true));
    }

    #[test]
    fn lines_parse_into_commands() {
        let c = parse("start order_food\nset place People's Square\nset dish  kung pao chicken \npick 2\ncancel\nclarify a b\nchat\nnone\nbogus\nset x\npick 0");
        assert_eq!(
            c,
            vec![
                Command::Start { flow: "order_food".into() },
                Command::Set { slot: "place".into(), value: "People's Square".into() },
                Command::Set { slot: "dish".into(), value: "kung pao chicken".into() },
                Command::Pick { n: 2 },
                Command::Cancel,
                Command::Clarify { flows: vec!["a".into(), "b".into()] },
                Command::Chat,
                Command::CannotHandle,
            ]
        );
        assert_eq!(parse(&"chat\nnone\n".repeat(3).replace("chat\nnone", "set a 1\nset b 2\nset c 3")).len(), 3);
        assert_eq!(parse(&(1..=12).map(|i| format!("set s{i} v")).collect::<Vec<_>>().join("\n")).len(), MAX_COMMANDS);
        assert_eq!(parse("chat\nchat"), vec![Command::Chat]);
    }
}
