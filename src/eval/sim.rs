//! Simulated users (τ-bench style): the local model plays the person, from
//! a goal and a persona the assistant never sees.

use super::dialogue::Simulated;
use super::score::Confirmation;
use crate::engine::{Engine, Event, Request};
use crate::engine::sampler::SamplingParams;
use crate::template::Message;
use anyhow::{bail, Result};

/// What the simulated user does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Move {
    Say(String),
    Confirm,
    Decline,
    /// The goal is reached.
    Done,
    GiveUp,
}

fn language(lang: &str) -> &'static str {
    match lang {
        "zh" => "Chinese (简体中文)",
        "ko" => "Korean (한국어)",
        _ => "English",
    }
}

/// The instructions: the model writes one line of a customer, it does not
/// play an assistant. (Chat models asked to be the person in a role-swapped
/// chat slip back into the assistant's voice: "Sure, I can help you with
/// that"; asked to continue a transcript whose goal they are handed in the
/// same message, they write the customer's line.)
pub fn system_prompt(lang: &str) -> String {
    format!(
        "You write what a customer types into a life-assistant app on their phone (rides, food, tickets, salons, bikes, groceries). \
         You are the customer, never the app. Reply with the customer's message only: one or two short sentences in {}, as a person types them, \
         with no explanations, quotes or brackets. Use the names and numbers of the goal and the facts exactly as given. \
         When the app lists options, choose one by its name. When the app asks to confirm a payment, write YES if it matches the goal, otherwise NO. \
         When the app says it is paid or booked, or has answered the goal's question, write DONE. If the goal cannot be reached, write GIVE UP.",
        language(lang)
    )
}

/// The goal and the conversation so far in one message, ending with the
/// request for the customer's next line.
pub fn messages(s: &Simulated, lang: &str, history: &[(bool, String)], pending: Option<&Confirmation>) -> Vec<Message> {
    let mut t = format!("What the customer wants (told to them as \"you\"):\n{}\n", s.goal.trim());
    if !s.persona.trim().is_empty() {
        t.push_str(&format!("The customer: {}\n", s.persona.trim()));
    }
    if !s.knows.is_empty() {
        t.push_str(&format!("Facts the customer gives when the app asks: {}\n", s.knows.join("; ")));
    }
    t.push_str("(Another customer, whose goal was a taxi from Jing'an Temple to Pudong Airport, first wrote: \"Get me a taxi from Jing'an Temple to Pudong Airport.\")\n\n");
    if history.is_empty() {
        t.push_str("The app is open and waiting. Nothing has been said yet.\n");
    } else {
        t.push_str("The conversation so far:\n");
        for (mine, text) in history {
            let text = text.trim().replace("\n\n", "\n");
            t.push_str(&format!("{}: {text}\n", if *mine { "Customer" } else { "App" }));
        }
        if let Some(c) = pending {
            t.push_str(&format!("App: [asks the customer to confirm the payment: {}]\n", c.summary.trim()));
        }
    }
    let what = if history.is_empty() {
        "first message, a request to the app for what they want (not a question to the app about what it needs)"
    } else if pending.is_some() {
        "answer: YES or NO for the payment"
    } else {
        "next message, or DONE if the goal has been reached, or GIVE UP"
    };
    t.push_str(&format!("\nWrite the customer's {what} ({}).", language(lang)));
    vec![Message::system(system_prompt(lang)), Message::user(t)]
}

/// Reads the model's reply as a move.
pub fn read_move(text: &str, pending: bool) -> Move {
    // A message the model put in quotes is the message.
    let t = text.trim().trim_matches(|c| matches!(c, '"' | '“' | '”' | '「' | '」')).trim();
    let up = t.to_uppercase();
    if up.contains("GIVE UP") || up.contains("GIVE_UP") {
        return Move::GiveUp;
    }
    // "DONE" first or last ("Thanks! DONE.") ends the dialogue.
    let bare = up.trim_end_matches(['.', '!', '。', '！', ' ']);
    if up.starts_with("DONE") || bare.ends_with("DONE") {
        return Move::Done;
    }
    if pending {
        let first: String = up.chars().take(12).collect();
        if ["YES", "是", "好", "确认", "네", "예", "확인", "OK", "SURE", "CONFIRM"].iter().any(|w| first.starts_with(w)) {
            return Move::Confirm;
        }
        if ["NO", "不", "아니", "취소", "CANCEL"].iter().any(|w| first.starts_with(w)) {
            return Move::Decline;
        }
    }
    Move::Say(t.to_owned())
}

/// One move of the simulated user.
pub async fn next_move(engine: &Engine, s: &Simulated, lang: &str, history: &[(bool, String)], pending: Option<&Confirmation>, seed: u64, temperature: f32) -> Result<Move> {
    let mut req = Request::chat(messages(s, lang, history, pending));
    req.max_tokens = 96;
    req.stop = vec!["\n\n".into()];
    req.sampling = if temperature > 0.0 { SamplingParams { temperature, top_p: 0.95, seed, ..SamplingParams::greedy() } } else { SamplingParams::greedy() };
    let mut rx = engine.submit(req)?;
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Delta(t) => text.push_str(&t),
            Event::Error(e) => bail!("the simulated user's model failed: {e}"),
            _ => {}
        }
    }
    let m = read_move(&text, pending.is_some());
    if m == Move::Say(String::new()) {
        return Ok(Move::GiveUp);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_are_read_in_three_languages() {
        assert_eq!(read_move("DONE", false), Move::Done);
        assert_eq!(read_move("\"Get me a taxi.\"", false), Move::Say("Get me a taxi.".into()));
        assert_eq!(read_move("Thanks! DONE.", false), Move::Done);
        assert_eq!(read_move("Is it done yet?", false), Move::Say("Is it done yet?".into()));
        assert_eq!(read_move("I give up.", false), Move::GiveUp);
        assert_eq!(read_move("Yes, go ahead.", true), Move::Confirm);
        assert_eq!(read_move("好的，确认", true), Move::Confirm);
        assert_eq!(read_move("네 결제해 주세요", true), Move::Confirm);
        assert_eq!(read_move("No, too expensive", true), Move::Decline);
        assert_eq!(read_move("不要了", true), Move::Decline);
        // Without an open confirmation a "yes" is just words.
        assert_eq!(read_move("Yes, to the airport", false), Move::Say("Yes, to the airport".into()));
    }

    #[test]
    fn the_conversation_is_one_transcript_and_the_confirmation_is_shown() {
        let s = Simulated { goal: "A ride to the airport".into(), persona: "terse".into(), knows: vec!["at home".into()], max_turns: 4 };
        let c = Confirmation { summary: "Comfort ride to PVG ¥88.00".into(), ..Default::default() };
        let m = messages(&s, "zh", &[(true, "去机场".into()), (false, "好的，这是报价".into())], Some(&c));
        assert_eq!(m.iter().map(|x| x.role.as_str()).collect::<Vec<_>>(), ["system", "user"]);
        assert!(m[0].content.contains("Chinese") && m[1].content.contains("A ride to the airport") && m[1].content.contains("at home"));
        assert!(m[1].content.contains("Customer: 去机场\nApp: 好的，这是报价"), "{}", m[1].content);
        assert!(m[1].content.contains("¥88.00") && m[1].content.contains("YES or NO"));
    }
}
