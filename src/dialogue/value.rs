//! Reading slot values: what the model proposes is kept only when the
//! person's message says it (grounding as validation), and typed values
//! are read by code (numbers, dates, times, places, options).

use super::ground::{contains_word, numbers_in, Evidence, DAY_PARTS, NUMBER_WORDS};
use crate::tools::flow::{SlotDef, SlotKind};
use crate::world::calendar::civil_from_days;
use crate::world::cities::{self, fold};
use serde_json::Value;

/// Why a proposed value was not taken.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejected {
    /// The message does not say it (the model made it up).
    NotSaid,
    /// Said, but not a place this world knows.
    UnknownPlace(String),
    /// Said, but out of range or unreadable.
    Invalid(String),
}

/// Whether `value` is in the person's words: case, spaces and punctuation
/// aside, whole, or most of its words.
pub fn said(value: &str, message: &str) -> bool {
    let (v, m) = (fold(value), fold(message));
    if v.is_empty() {
        return false;
    }
    if m.contains(&v) {
        return true;
    }
    let words: Vec<String> = value.split_whitespace().map(fold).filter(|w| w.chars().count() >= 2).collect();
    if words.len() >= 2 {
        let hit = words.iter().filter(|w| m.contains(w.as_str())).count();
        return hit * 10 >= words.len() * 7;
    }
    false
}

/// A count in `value` (digits or a number word).
fn number(value: &str) -> Option<i64> {
    let v = value.trim().to_lowercase();
    if let Ok(n) = v.parse::<i64>() {
        return Some(n);
    }
    NUMBER_WORDS.iter().find(|(w, _)| v == *w).map(|(_, n)| *n)
}

/// The counts a message names: digits standing alone and number words.
/// Counters that follow a number in Chinese and Korean ("两份", "두 개").
const COUNTERS: &[&str] = &["份", "个", "個", "张", "張", "位", "人", "杯", "瓶", "碗", "斤", "盒", "箱", "袋", "串", "장", "개", "명", "잔", "그릇", "병", "인분", "봉지", "팩", "대", "곳"];

/// Whether a number word stands as a count in `text`: English words whole,
/// Chinese and Korean ones of one character only before a counter ("세"
/// alone is inside "주세요").
fn number_word_in(text: &str, w: &str) -> bool {
    if w.is_ascii() {
        return contains_word(text, w);
    }
    if w.chars().count() > 1 {
        return text.contains(w);
    }
    text.match_indices(w).any(|(i, _)| {
        let rest = text[i + w.len()..].trim_start();
        COUNTERS.iter().any(|c| rest.starts_with(c))
    })
}

pub fn counts_in(message: &str) -> Vec<i64> {
    let text = message.to_lowercase();
    let mut out: Vec<i64> = NUMBER_WORDS.iter().filter(|(w, _)| number_word_in(&text, w)).map(|(_, n)| *n).collect();
    for w in text.split(|c: char| c.is_whitespace() || "，。,.!?！？".contains(c)) {
        let digits: String = w.chars().take_while(|c| c.is_ascii_digit()).collect();
        let rest: String = w.chars().skip_while(|c| c.is_ascii_digit()).collect();
        // "3", "3份", "2장", "2개", "2x": a count; "06:25", "G6127", "2026-11-23": not.
        let unit = rest.is_empty() || ["x", "×", "portions", "tickets", "kg", "公斤", "千克", "킬로"].iter().chain(COUNTERS).any(|u| rest.starts_with(u));
        if !digits.is_empty() && unit {
            if let Ok(n) = digits.parse() {
                out.push(n);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A time of day as `HH:MM` from words like "7pm", "19:00", "晚上7点",
/// "오후 7시", "7:30".
pub fn time_in(text: &str) -> Option<String> {
    let t = text.to_lowercase();
    let pm = ["pm", "p.m", "evening", "tonight", "下午", "晚上", "今晚", "明晚", "傍晚", "오후", "저녁", "밤"].iter().any(|w| t.contains(w));
    let am = ["am", "a.m", "morning", "上午", "早上", "凌晨", "오전", "아침", "새벽"].iter().any(|w| contains_word(&t, w) || (!w.is_ascii() && t.contains(w)));
    // hh:mm first.
    let chars: Vec<char> = t.chars().collect();
    for i in 0..chars.len() {
        if chars[i] == ':' && i > 0 {
            let h: String = chars[..i].iter().rev().take_while(|c| c.is_ascii_digit()).collect::<Vec<_>>().into_iter().rev().collect();
            let m: String = chars[i + 1..].iter().take_while(|c| c.is_ascii_digit()).collect();
            if let (Ok(h), Ok(m)) = (h.parse::<u32>(), m.parse::<u32>()) {
                if h < 24 && m < 60 && m.to_string().len() <= 2 {
                    let h = if pm && h < 12 { h + 12 } else { h };
                    return Some(format!("{h:02}:{m:02}"));
                }
            }
        }
    }
    // "7pm", "7 pm", "7点", "7시", "7点半", "at 7".
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            let n: u32 = chars[start..i].iter().collect::<String>().parse().unwrap_or(99);
            let after: String = chars[i..].iter().collect::<String>();
            let after = after.trim_start();
            let hourish = ["pm", "am", "p.m", "a.m", "点", "點", "시", "o'clock", "oclock"].iter().any(|u| after.starts_with(u));
            let before: String = chars[..start].iter().collect();
            let at = before.trim_end().ends_with(" at") || before.trim_end() == "at" || before.ends_with("at ");
            if n <= 24 && (hourish || at) {
                let half = after.starts_with("点半") || after.starts_with("시 반") || after.starts_with("시반") || after.starts_with("點半");
                // "10点20", "10点20分", "10시 20분": the minutes after the hour.
                let minutes: Option<u32> = ["点", "點", "시"].iter().find_map(|u| after.strip_prefix(u)).and_then(|r| {
                    let r = r.trim_start();
                    let d: String = r.chars().take_while(|c| c.is_ascii_digit()).collect();
                    let rest = r[d.len()..].trim_start();
                    let unit = rest.is_empty() || rest.starts_with('分') || rest.starts_with('분') || !rest.starts_with(|c: char| c.is_alphanumeric()) || rest.starts_with("那") || rest.starts_with("的");
                    d.parse::<u32>().ok().filter(|m| *m < 60 && !d.is_empty() && d.len() <= 2 && unit)
                });
                let mut h = n;
                if (pm || after.starts_with("pm") || after.starts_with("p.m")) && h < 12 {
                    h += 12;
                }
                if (am || after.starts_with("am")) && h == 12 {
                    h = 0;
                }
                if !pm && !am && !after.starts_with("am") && hourish && (1..=6).contains(&h) && !after.starts_with("点") && !after.starts_with("시") {
                    h += 12;
                }
                return Some(format!("{h:02}:{:02}", minutes.unwrap_or(if half { 30 } else { 0 })));
            }
        } else {
            i += 1;
        }
    }
    if t.contains("noon") || t.contains("中午") || t.contains("정오") {
        return Some("12:00".into());
    }
    None
}

/// Whether the hour of `hm` is in the message (or a part of day that holds it).
fn time_said(hm: &str, message: &str) -> bool {
    let Some((h, m)) = hm.split_once(':').and_then(|(h, m)| Some((h.parse::<i64>().ok()?, m.parse::<i64>().ok()?))) else { return false };
    let t = message.to_lowercase();
    let nums = numbers_in(&t);
    let hour = nums.contains(&h) || (h > 12 && nums.contains(&(h - 12))) || (h == 12 && t.contains("noon"));
    let minute = m == 0 || nums.contains(&m) || (m == 30 && (t.contains("half") || t.contains('半') || t.contains('반')));
    if hour && minute {
        return true;
    }
    DAY_PARTS.iter().any(|(words, lo, hi)| words.iter().any(|w| t.contains(w)) && (*lo as i64..=*hi as i64).contains(&h) && m == 0 && !nums.iter().any(|n| (1..=24).contains(n)))
}

/// The days a message can mean (relative words, weekdays, month/day).
pub fn dates_in(message: &str, today: i64) -> Vec<i64> {
    let e = Evidence { user: vec![message.to_owned()], today, ..Default::default() };
    let mut d = e.dates_said();
    d.sort();
    d.dedup();
    // A month and day means its next occurrence: "12월 6일" is this year's
    // while it is ahead, else next year's, not both.
    let same_day_a_year_apart = |a: i64, b: i64| {
        let (ya, ma, da) = civil_from_days(a);
        let (yb, mb, db) = civil_from_days(b);
        (ma, da) == (mb, db) && yb == ya + 1
    };
    let all = d.clone();
    d.retain(|&x| {
        let later_twin = all.iter().any(|&y| same_day_a_year_apart(x, y));
        let earlier_twin = all.iter().any(|&y| same_day_a_year_apart(y, x));
        !(later_twin && x < today) && !(earlier_twin && all.iter().any(|&y| same_day_a_year_apart(y, x) && y >= today))
    });
    d
}

pub fn ymd(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// An enum value the message names by the value itself or a synonym; only
/// one may match.
pub fn enum_in(slot: &SlotDef, message: &str) -> Option<String> {
    match enums_named(slot, message).as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

/// Checks a value the model proposed for `slot` against the message, and
/// returns it in the form the flow's calls use.
/// The new value of a correction copied whole ("강남대로 말고 테헤란로 152",
/// "not Julu Road but 8 Fuzhou Road", "8 Fuzhou Road instead of Julu Road",
/// "不是巨鹿路，是福州路8号"): the part that replaces the old one.
pub fn corrected(value: &str) -> String {
    let v = value.trim();
    // The new value after the marker ("but" and "是" only after "not" and
    // "不是": "kung pao chicken but mild" is one dish) …
    let not = v.to_lowercase().starts_with("not ") || v.starts_with("不是");
    for m in [" 말고 ", "말고 ", " but ", "改成", "改为", "换成", "改到", "，是", ",是", "而是"] {
        if !not && matches!(m, " but " | "，是" | ",是" | "而是") {
            continue;
        }
        if let Some(i) = v.rfind(m) {
            let after = v[i + m.len()..].trim();
            if !after.is_empty() {
                return after.to_owned();
            }
        }
    }
    // … or before it.
    for m in [" instead of ", " rather than ", " 대신"] {
        if let Some(i) = v.find(m) {
            let before = v[..i].trim();
            if !before.is_empty() {
                return before.to_owned();
            }
        }
    }
    v.to_owned()
}

pub fn read(slot: &SlotDef, value: &str, message: &str, today: i64) -> Result<Value, Rejected> {
    let value = value.trim();
    match slot.kind {
        SlotKind::Text => {
            // The value as a whole, or its longest comma-separated part, must
            // be in the words (a model pads "People's Square, 200 Renmin Road").
            // A bare number is a count or a time, not a name or a query ("set query 2").
            let bare = |v: &str| slot.pattern.is_none() && !v.trim().is_empty() && v.trim().chars().all(|c| c.is_ascii_digit());
            let fits = |v: &str| fold(message).contains(&fold(v)) && !fold(v).is_empty() && !bare(v) && slot.pattern.as_deref().is_none_or(|p| regex::Regex::new(p).is_ok_and(|r| r.is_match(v)));
            let tidy = super::ground::tidy(&corrected(value));
            if fits(&tidy) {
                return Ok(Value::String(tidy));
            }
            let mut parts: Vec<&str> = tidy.split([',', '，', '、', ';']).map(str::trim).filter(|p| fits(p)).collect();
            parts.sort_by_key(|p| std::cmp::Reverse(p.chars().count()));
            match parts.first() {
                Some(p) => Ok(Value::String((*p).to_owned())),
                None if said(value, message) => Err(Rejected::Invalid(format!("`{value}` does not look like a {}", slot.description.as_deref().unwrap_or(&slot.name)))),
                None => Err(Rejected::NotSaid),
            }
        }
        SlotKind::Place => {
            if !said(value, message) {
                // Translated ("Pudong Airport" for 浦东机场): the place the
                // message names in its own words, if it is the same place.
                let same = |p: &str| cities::place(p, None).map(|(_, x)| x.id);
                if let Some(id) = same(value) {
                    if let Some(own) = places_in(message).into_iter().find(|p| same(p) == Some(id)) {
                        return Ok(Value::String(own));
                    }
                }
                return Err(Rejected::NotSaid);
            }
            if cities::city(value).is_some() || cities::place(value, None).is_some() {
                return Ok(Value::String(value.to_owned()));
            }
            // A Korean particle copied with the place ("훙차오역까지", "명동에서").
            let bare = ["까지", "에서", "부터", "으로", "로", "에"].iter().find_map(|p| value.strip_suffix(p)).map(str::trim).filter(|b| b.chars().count() >= 2);
            if let Some(b) = bare.filter(|b| cities::city(b).is_some() || cities::place(b, None).is_some()) {
                Ok(Value::String(b.to_owned()))
            } else {
                Err(Rejected::UnknownPlace(value.to_owned()))
            }
        }
        SlotKind::Count => {
            let n = number(value).ok_or_else(|| Rejected::Invalid(format!("`{value}` is not a number")))?;
            let (lo, hi) = slot.bounds();
            if !(lo..=hi).contains(&n) {
                return Err(Rejected::Invalid(format!("{n} is not between {lo} and {hi}")));
            }
            // One needs no saying ("a coffee"); other counts must be in the words.
            if n != 1 && !counts_in(message).contains(&n) {
                return Err(Rejected::NotSaid);
            }
            Ok(Value::from(n))
        }
        SlotKind::Enum => {
            let v = slot.values.iter().find(|v| v.eq_ignore_ascii_case(value)).ok_or_else(|| Rejected::Invalid(format!("`{value}` is not one of {}", slot.values.join(", "))))?;
            let t = message.to_lowercase();
            let named = contains_word(&t, &v.to_lowercase()) || contains_word(&t, &v.to_lowercase().replace('_', " ")) || slot.synonyms.get(v).is_some_and(|ws| ws.iter().any(|w| contains_word(&t, &w.to_lowercase())));
            if named {
                Ok(Value::String(v.clone()))
            } else {
                Err(Rejected::NotSaid)
            }
        }
        SlotKind::Date => {
            let days = dates_in(message, today);
            if let Ok(d) = crate::world::calendar::parse_date_loose(value) {
                if days.contains(&d) {
                    return Ok(Value::String(ymd(d)));
                }
            }
            let from_value = dates_in(value, today);
            match (days.as_slice(), from_value.iter().find(|d| days.contains(d))) {
                (_, Some(d)) => Ok(Value::String(ymd(*d))),
                ([one], None) => Ok(Value::String(ymd(*one))),
                _ => Err(Rejected::NotSaid),
            }
        }
        SlotKind::Time => {
            // The message reads the same hour with its context ("오후 3시 반"
            // for the model's "3시", "下午4点" for "4点"): its reading wins.
            let hour = |hm: &str| hm.get(..2).and_then(|h| h.parse::<u32>().ok()).map(|h| h % 12);
            let hm = match (time_in(value), time_in(message)) {
                (Some(v), Some(m)) if hour(&v) == hour(&m) => m,
                (v, m) => v.or(m).ok_or(Rejected::NotSaid)?,
            };
            if time_said(&hm, message) {
                Ok(Value::String(hm))
            } else {
                Err(Rejected::NotSaid)
            }
        }
        SlotKind::Choice => Err(Rejected::Invalid("choices are picked from options".into())),
    }
}

/// A value code can read from the message alone, without the model: the
/// one date it names, a time, an enum value by its words, the one count.
pub fn from_message(slot: &SlotDef, message: &str, today: i64) -> Option<Value> {
    match slot.kind {
        SlotKind::Date => match dates_in(message, today).as_slice() {
            [one] => Some(Value::String(ymd(*one))),
            _ => None,
        },
        SlotKind::Time => time_in(message).filter(|hm| time_said(hm, message)).map(Value::String),
        SlotKind::Enum => enum_in(slot, message).map(Value::String),
        SlotKind::Count => match counts_in(message).as_slice() {
            [n] if (slot.bounds().0..=slot.bounds().1).contains(n) => Some(Value::from(*n)),
            _ => None,
        },
        _ => None,
    }
}

/// The known places a message names, longest names first.
pub fn places_in(message: &str) -> Vec<String> {
    let m = fold(message);
    let mut out: Vec<String> = Vec::new();
    for c in cities::all() {
        for n in c.name.all() {
            let f = fold(n);
            if f.chars().count() >= 2 && m.contains(&f) && !out.iter().any(|o| fold(o).contains(&f)) {
                out.push(n.to_owned());
            }
        }
        for p in c.places {
            for n in p.name.all().into_iter().chain(p.aliases.iter().copied()) {
                // "Shanghai Hongqiao Railway Station" is also said without its city.
                let short = c.name.all().iter().find_map(|cn| n.strip_prefix(cn)).map(str::trim).filter(|x| x.chars().count() >= 2);
                for name in std::iter::once(n).chain(short) {
                    let f = fold(name);
                    if f.chars().count() >= 2 && m.contains(&f) && !out.iter().any(|o| fold(o).contains(&f)) {
                        out.push(name.to_owned());
                    }
                }
            }
        }
    }
    out.sort_by_key(|n| std::cmp::Reverse(fold(n).len()));
    // Drop names inside longer ones ("Hongqiao" in "Hongqiao Railway Station").
    let mut kept: Vec<String> = Vec::new();
    for n in out {
        if !kept.iter().any(|k| fold(k).contains(&fold(&n))) {
            kept.push(n);
        }
    }
    kept
}

/// The place the words give a role: `origin` ("from X", "从X", "X에서",
/// "X出发") or `destination` ("to Y", "去Y", "到Y", "Y까지", "Y로", "Y 가는").
/// Only when exactly one named place has the role.
pub fn place_in_role(message: &str, role: &str) -> Option<String> {
    let lower = message.to_lowercase();
    let (before, after): (&[&str], &[&str]) = match role {
        // "上海到杭州", "人民广场去虹桥": the place before 到/去 is the start.
        "origin" => (&["from ", "从", "由"], &["에서", "出发", " 출발", "到", "去", "至", "→"]),
        "destination" => (&["to ", "去", "到", "往", "至"], &["까지", "으로", "로 ", "로,", "行", " 가는", "가는"]),
        _ => return None,
    };
    let mut hits: Vec<String> = Vec::new();
    for p in places_in(message) {
        let pl = p.to_lowercase();
        let Some(i) = lower.find(&pl) else { continue };
        let head = lower[..i].trim_end_matches([' ', '的']);
        let tail = &lower[i + pl.len()..];
        let cue_before = before.iter().any(|c| head.ends_with(c.trim_end()) && (c.is_ascii() || !c.ends_with(' ')));
        let cue_after = after.iter().any(|c| tail.starts_with(c) || tail.trim_start().starts_with(c.trim())) || (role == "origin" && tail.starts_with(" to ") && !head.ends_with("to"));
        if cue_before || cue_after {
            // In the person's own spelling.
            hits.push(message.get(i..i + pl.len()).map(str::to_owned).unwrap_or(p));
        }
    }
    match hits.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

/// The one place a message names for a slot without a role ("Urban Cut
/// near Jing'an Temple in Shanghai": Jing'an Temple). A city named with a
/// place inside it gives way to the place; two places apart give none.
pub fn place_for(message: &str) -> Option<String> {
    let found = places_in(message);
    let city_of = |n: &str| cities::city(n).map(|c| c.id).or_else(|| cities::place(n, None).map(|(c, _)| c.id));
    let kept: Vec<&String> = found
        .iter()
        .filter(|n| match cities::city(n) {
            Some(c) => !found.iter().any(|o| o != *n && cities::city(o).is_none() && city_of(o) == Some(c.id)),
            None => true,
        })
        .collect();
    match kept.as_slice() {
        [one] => Some((*one).clone()),
        _ => None,
    }
}

/// Every value of an enum the message names, by itself or a synonym.
pub fn enums_named(slot: &SlotDef, message: &str) -> Vec<String> {
    let t = message.to_lowercase();
    slot.values
        .iter()
        .filter(|v| {
            let own = contains_word(&t, &v.to_lowercase().replace('_', " ")) || contains_word(&t, &v.to_lowercase());
            own || slot.synonyms.get(*v).is_some_and(|ws| ws.iter().any(|w| contains_word(&t, &w.to_lowercase())))
        })
        .cloned()
        .collect()
}

/// The enum value a message gives a slot that holds `current`: the one it
/// names, or, when it names two and one is the current value, the other
/// ("专车太贵了，还是换成快车吧": economy).
pub fn enum_change(slot: &SlotDef, message: &str, current: Option<&str>) -> Option<String> {
    let named = enums_named(slot, message);
    match named.as_slice() {
        [one] => Some(one.clone()),
        [a, b] => match current {
            Some(c) if c == a => Some(b.clone()),
            Some(c) if c == b => Some(a.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// A date a message gives to change one already set: one day it names,
/// "now" aside ("…pay now" is no new travel date).
pub fn date_change(message: &str, today: i64) -> Option<Value> {
    let mut t = message.to_lowercase();
    for w in ["right now", "现在", "马上", "지금", "바로"] {
        t = t.replace(w, " ");
    }
    let t = regex::Regex::new(r"\bnow\b").map(|r| r.replace_all(&t, " ").into_owned()).unwrap_or(t);
    match dates_in(&t, today).as_slice() {
        [one] => Some(Value::String(ymd(*one))),
        _ => None,
    }
}

/// Words before a delivery address: "deliver to", "送到", "주소는".
const ADDRESS_CUES: &[&str] = &[
    "delivered to", "deliver it to", "deliver to", "deliver them to", "send it to", "bring it to", "address is", "address:", "the address", "address",
    "送到", "送至", "配送到", "寄到", "地址是", "地址：", "地址:", "地址", "주소는", "주소:", "주소", "배달지는",
];

/// The stretch of the message that is a delivery address: the clause with
/// a number in it that follows an address cue, without the cue and the
/// words that close the sentence ("주소는 와우산로 94야": 와우산로 94).
pub fn address_in(message: &str) -> Option<String> {
    let lower = message.to_lowercase();
    let mut best: Option<String> = None;
    for cue in ADDRESS_CUES {
        let Some(i) = lower.rfind(cue) else { continue };
        // The same byte offsets hold in the original: lowercasing kept the lengths of these scripts.
        if lower.len() != message.len() {
            break;
        }
        let after = &message[i + cue.len()..];
        let after = after.trim_start_matches([' ', ':', '：', '是']);
        let end = after.find(['，', '。', ';', '；', '!', '?', '！', '？', '\n']).unwrap_or(after.len());
        let mut clause = after[..end].trim();
        // A full stop ends it only before a space or the end ("No. 5" stays).
        if let Some(j) = clause.find(". ") {
            clause = clause[..j].trim();
        }
        let clause = clause.trim_end_matches(['.', ',']);
        let clause = close_sentence(clause);
        if clause.chars().any(|c| c.is_ascii_digit() || ('０'..='９').contains(&c)) && clause.chars().count() >= 3 && clause.chars().count() <= 60 {
            best = Some(clause.to_owned());
            break;
        }
    }
    // A correction said whole ("강남대로 말고 테헤란로 152") gives the new one.
    best.or_else(|| address_before_cue(message)).map(|a| corrected(&a))
}

/// Korean puts the cue after the address: "200 Renmin Road로 배달해 줘",
/// "테헤란로 152로 보내 줘".
fn address_before_cue(message: &str) -> Option<String> {
    for cue in ["으로 배달", "로 배달", "으로 보내", "로 보내", "까지 배달", "에 배달"] {
        let Some(i) = message.find(cue) else { continue };
        let head = &message[..i];
        let start = head.rfind([',', '，', '.', '。', ';', '；', '!', '?']).map(|j| j + head[j..].chars().next().map_or(1, char::len_utf8)).unwrap_or(0);
        let clause = head[start..].trim();
        if clause.chars().any(|c| c.is_ascii_digit()) && (3..=60).contains(&clause.chars().count()) {
            return Some(clause.to_owned());
        }
    }
    None
}

/// Words that close a Chinese or Korean sentence after a value ("…94야",
/// "…号吧", "…152로 해 줘").
fn close_sentence(s: &str) -> &str {
    let mut t = s.trim();
    for end in ["로 해 줘", "로 해줘", "으로 해 줘", "로 부탁해", "입니다", "이에요", "예요", "이야", "야", "요", "吧", "啊", "呢", "哦", ", please", " please"] {
        if let Some(x) = t.strip_suffix(end) {
            // Korean copulas only after a number or a Hangul syllable.
            if !x.trim().is_empty() {
                t = x.trim_end();
                break;
            }
        }
    }
    t
}

/// A delivery address the model copied in part ("100号" of "送到杭州市延安路100号"):
/// the whole address the message gives around it, when there is one.
pub fn widen_address(value: &str, message: &str) -> String {
    match address_in(message) {
        Some(a) if fold(&a).contains(&fold(value)) && a.chars().count() > value.chars().count() => a,
        _ => value.to_owned(),
    }
}

/// An option on screen: its value, its names in every language, the whole object.
#[derive(Debug, Clone)]
pub struct Opt {
    pub id: String,
    pub labels: Vec<String>,
    pub data: Value,
}

/// The options a choice slot offers from a result.
pub fn options(slot: &SlotDef, result: &Value) -> Vec<Opt> {
    let Some(items) = result.pointer(slot.list_pointer()).and_then(Value::as_array) else { return Vec::new() };
    items
        .iter()
        .filter_map(|it| {
            let id = match &it[slot.value_field()] {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => return None,
            };
            let labels = match &it[slot.label_field()] {
                Value::String(s) => vec![s.clone()],
                Value::Object(o) => o.values().filter_map(Value::as_str).map(str::to_owned).collect(),
                _ => Vec::new(),
            };
            Some(Opt { id, labels, data: it.clone() })
        })
        .collect()
}

/// Words that name many options, never one: "kitchen", "restaurant", …
const COMMON: &[&str] = &["kitchen", "restaurant", "house", "shop", "store", "salon", "the", "and", "home", "hair", "studio", "cafe", "station", "餐厅", "饭店", "美发", "식당"];

/// The option the text names: its id, its whole name in any language, or
/// a distinctive word of its name that no other option has. `None` when
/// none or several match.
pub fn option_named(text: &str, opts: &[Opt]) -> Option<usize> {
    let t = fold(text);
    if t.is_empty() {
        return None;
    }
    let by = |f: &dyn Fn(&Opt) -> bool| -> Option<usize> {
        let hits: Vec<usize> = opts.iter().enumerate().filter(|(_, o)| f(o)).map(|(i, _)| i).collect();
        match hits.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    };
    if let Some(i) = by(&|o| text.contains(o.id.as_str()) && o.id.len() >= 3) {
        return Some(i);
    }
    if let Some(i) = by(&|o| o.labels.iter().any(|l| fold(l).chars().count() >= 2 && t.contains(&fold(l)))) {
        return Some(i);
    }
    // Distinctive pieces: Latin words of 4+ letters, or two-character runs of CJK/Hangul.
    // Word by word, so a Latin name with a "·" in it stays Latin.
    let pieces = |o: &Opt| -> Vec<String> {
        let mut p = Vec::new();
        for l in &o.labels {
            for word in l.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
                if word.is_ascii() {
                    let w = word.to_lowercase();
                    if w.len() >= 4 && !COMMON.contains(&w.as_str()) {
                        p.push(w);
                    }
                } else {
                    let cs: Vec<char> = word.chars().collect();
                    p.extend(cs.windows(2).map(|w| w.iter().collect::<String>()).filter(|w| !COMMON.contains(&w.as_str())));
                }
            }
        }
        p
    };
    let all: Vec<Vec<String>> = opts.iter().map(pieces).collect();
    let lower = text.to_lowercase();
    let hits: Vec<usize> = (0..opts.len())
        .filter(|&i| {
            all[i].iter().any(|w| {
                let unique = all.iter().enumerate().all(|(j, ws)| j == i || !ws.contains(w));
                unique && if w.is_ascii() { contains_word(&lower, w) } else { lower.contains(w.as_str()) }
            })
        })
        .collect();
    match hits.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// The option a hint slot's words name ("Nanxiang", 블로썸 살롱 for 블로썸
/// 살롱 명동점): a whole name either way round, or a distinctive Latin word;
/// never a two-character piece (a hint often repeats the place).
pub fn option_hinted(hint: &str, opts: &[Opt]) -> Option<usize> {
    let h = fold(hint);
    if h.chars().count() < 2 {
        return None;
    }
    let hits: Vec<usize> = opts.iter().enumerate().filter(|(_, o)| o.labels.iter().any(|l| {
        let l = fold(l);
        l.chars().count() >= 2 && (h.contains(&l) || l.contains(&h))
    })).map(|(i, _)| i).collect();
    if let [one] = hits.as_slice() {
        return Some(*one);
    }
    if !hits.is_empty() {
        return None;
    }
    let latin: Vec<Opt> = opts.iter().map(|o| Opt { labels: o.labels.iter().filter(|l| l.is_ascii() || l.split_whitespace().all(|w| w.is_ascii() || w == "·")).cloned().collect(), ..o.clone() }).collect();
    if hint.is_ascii() {
        return option_named(hint, &latin);
    }
    None
}

/// The option the text names in full: its id or a whole name in any
/// language (what a long message may be matched on without the model).
pub fn option_named_fully(text: &str, opts: &[Opt]) -> Option<usize> {
    let t = fold(text);
    let hits: Vec<usize> = opts
        .iter()
        .enumerate()
        .filter(|(_, o)| (o.id.len() >= 3 && text.contains(o.id.as_str())) || o.labels.iter().any(|l| fold(l).chars().count() >= 2 && t.contains(&fold(l))))
        .map(|(i, _)| i)
        .collect();
    match hits.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// The brand of an option without its branch ("Urban Cut · Jing'an
/// Temple", "丝绸发艺（人民广场店）", "블로썸 살롱 명동점"): the option the
/// text names by brand alone, when one option has that brand.
pub fn option_by_brand(text: &str, opts: &[Opt]) -> Option<usize> {
    let t = fold(text);
    let brand = |l: &str| -> Option<String> {
        let mut b = l.split(" · ").next().unwrap_or(l).split(['（', '(']).next().unwrap_or(l).trim().to_owned();
        if let Some((head, last)) = b.rsplit_once(' ') {
            if last.ends_with('점') && !head.is_empty() {
                b = head.to_owned();
            }
        }
        let f = fold(&b);
        let long_enough = if b.is_ascii() { f.len() >= 5 } else { f.chars().count() >= 3 };
        long_enough.then_some(f)
    };
    let hits: Vec<usize> = opts.iter().enumerate().filter(|(_, o)| o.labels.iter().filter_map(|l| brand(l)).any(|b| t.contains(&b))).map(|(i, _)| i).collect();
    match hits.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// Whether an option's data holds the time `hm` ("10:20" or "…T10:20").
fn at_time(o: &Opt, hm: &str) -> bool {
    let d = o.data.to_string();
    d.contains(&format!("\"{hm}\"")) || d.contains(&format!("T{hm}"))
}

/// Of several options with the name the text says ("Neon Harbor at 10:00"
/// when it shows at 10:00 and at 12:30), the one at the time it says.
pub fn option_named_at(text: &str, opts: &[Opt]) -> Option<usize> {
    let t = fold(text);
    let hm = time_in(text)?;
    let named: Vec<usize> = opts.iter().enumerate().filter(|(_, o)| o.labels.iter().any(|l| fold(l).chars().count() >= 2 && t.contains(&fold(l)))).map(|(i, _)| i).collect();
    let at: Vec<usize> = named.into_iter().filter(|&i| at_time(&opts[i], &hm)).collect();
    match at.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// The one option whose data holds the time the text says ("就订上午10点20那班":
/// the train leaving at 10:20).
pub fn option_at_time(text: &str, opts: &[Opt]) -> Option<usize> {
    let hm = time_in(text)?;
    let at: Vec<usize> = (0..opts.len()).filter(|&i| at_time(&opts[i], &hm)).collect();
    match at.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// An ordinal or a bare number in the text: "the first one", "second",
/// "第二个", "두 번째", "2", "#3".
pub fn ordinal(text: &str) -> Option<usize> {
    let t = text.trim().to_lowercase();
    let words: [(&[&str], usize); 5] = [
        (&["first", "1st", "第一", "头一个", "첫 번째", "첫번째", "첫째", "1번", "nearest", "closest", "제일 가까운", "가장 가까운", "离我最近", "最近的那", "最近的一"], 1),
        (&["second", "2nd", "第二", "두 번째", "두번째", "둘째", "2번"], 2),
        (&["third", "3rd", "第三", "세 번째", "세번째", "셋째", "3번"], 3),
        (&["fourth", "4th", "第四", "네 번째", "네번째", "4번"], 4),
        (&["fifth", "5th", "第五", "다섯 번째", "5번"], 5),
    ];
    let hits: Vec<usize> = words.iter().filter(|(ws, _)| ws.iter().any(|w| if w.is_ascii() { contains_word(&t, w) } else { t.contains(w) })).map(|(_, n)| *n).collect();
    if let [one] = hits.as_slice() {
        return Some(*one);
    }
    let bare = t.trim_start_matches(['#', 'n', 'o', '.', ' ']).trim_end_matches(['.', '!', '。']);
    bare.parse::<usize>().ok().filter(|n| (1..=20).contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slot(kind: SlotKind) -> SlotDef {
        serde_json::from_value(json!({"name": "s", "type": kind, "required": false})).unwrap()
    }

    #[test]
    fn text_must_be_said() {
        assert!(said("200 Renmin Road", "deliver to 200 renmin road please"));
        assert!(said("申虹路88号", "地址是申虹路88号。"));
        assert!(!said("People's Square", "deliver to 200 Renmin Road"));
        assert_eq!(read(&slot(SlotKind::Text), "88 Shenhong Road", "to 88 Shenhong Road", 0), Ok(json!("88 Shenhong Road")));
        assert_eq!(read(&slot(SlotKind::Text), "People's Square", "to 88 Shenhong Road", 0), Err(Rejected::NotSaid));
        // Padding is cut to the part that was said; a pattern is enforced.
        let mut addr = slot(SlotKind::Text);
        addr.pattern = Some("[0-9]".into());
        assert_eq!(read(&addr, "People's Square, 200 Renmin Road", "near People's Square, delivered to 200 Renmin Road", 0), Ok(json!("200 Renmin Road")));
        assert!(read(&addr, "Shanghai, Shanghai, Shanghai", "I'm at Hongqiao Railway Station in Shanghai.", 0).is_err());
        assert!(read(&addr, "上海虹桥站附近", "上海虹桥站附近有卖生煎包的外卖吗？", 0).is_err());
    }

    #[test]
    fn places_must_be_said_and_known() {
        let s = slot(SlotKind::Place);
        assert!(read(&s, "People's Square", "near peoples square", 0).is_ok());
        assert!(read(&s, "人民广场", "人民广场附近", 0).is_ok());
        assert_eq!(read(&s, "上海欢乐谷", "帮我在上海欢乐谷附近点一份小笼包外卖", 0), Err(Rejected::UnknownPlace("上海欢乐谷".into())));
        assert_eq!(read(&s, "Pudong Airport", "to People's Square", 0), Err(Rejected::NotSaid));
        assert_eq!(read(&s, "훙차오역까지", "상하이 와이탄에서 훙차오역까지 택시 요금 알려 줘.", 0), Ok(json!("훙차오역")));
        // A translation of the place the message names is that place, in the person's words.
        assert_eq!(read(&s, "Pudong Airport", "帮我叫辆出租车去浦东机场", 0), Ok(json!("浦东机场")));
        assert_eq!(places_in("from Hongqiao Railway Station to People's Square"), vec!["Hongqiao Railway Station".to_string(), "People's Square".to_string()]);
        assert_eq!(place_in_role("from the Bund to Hongqiao Railway Station", "origin").as_deref(), Some("the Bund"));
        assert_eq!(place_in_role("从外滩到虹桥火车站", "destination").as_deref(), Some("虹桥火车站"));
        assert_eq!(place_in_role("12월 5일에 서울에서 부산 가는 KTX", "origin").as_deref(), Some("서울"));
        assert_eq!(place_in_role("12월 5일에 서울에서 부산 가는 KTX", "destination").as_deref(), Some("부산"));
        assert_eq!(place_in_role("명동에서 강남역까지 택시", "destination").as_deref(), Some("강남역"));
    }

    #[test]
    fn counts_dates_and_times_are_read_by_code() {
        let s = slot(SlotKind::Count);
        assert_eq!(read(&s, "3", "Actually, make it three.", 0), Ok(json!(3)));
        assert_eq!(read(&s, "2", "两份", 0), Ok(json!(2)));
        assert_eq!(read(&s, "1", "one order of xiaolongbao", 0), Ok(json!(1)));
        assert_eq!(read(&s, "4", "make it three", 0), Err(Rejected::NotSaid));
        assert_eq!(counts_in("G1234 at 06:25 on 2026-11-23"), Vec::<i64>::new());
        assert_eq!(counts_in("2장 주세요"), vec![2]);
        // 2026-11-22 is a Sunday.
        let today = crate::world::calendar::days_from_civil(2026, 11, 22).unwrap();
        let d = slot(SlotKind::Date);
        assert_eq!(from_message(&d, "train to Hangzhou tomorrow", today), Some(json!("2026-11-23")));
        assert_eq!(read(&d, "2026-11-25", "明天去杭州", today), Ok(json!("2026-11-23")));
        assert_eq!(read(&d, "2026-11-25", "去杭州", today), Err(Rejected::NotSaid));
        assert_eq!(time_in("at 7pm"), Some("19:00".into()));
        assert_eq!(time_in("晚上7点半"), Some("19:30".into()));
        assert_eq!(time_in("오후 3시"), Some("15:00".into()));
        assert_eq!(time_in("14:30 please"), Some("14:30".into()));
        assert_eq!(read(&slot(SlotKind::Time), "15:00", "오후 3시에 예약", 0), Ok(json!("15:00")));
        assert_eq!(read(&slot(SlotKind::Time), "18:00", "오후 3시에 예약", 0), Err(Rejected::NotSaid));
    }

    #[test]
    fn options_are_named_by_id_name_distinctive_word_or_ordinal() {
        let r = json!({"items": [
            {"id": "sh03", "name": {"en": "Nanxiang Dumpling House", "zh": "南翔小笼"}},
            {"id": "sh04", "name": {"en": "Old Shanghai Canteen", "zh": "老上海食堂"}},
        ]});
        let s: SlotDef = serde_json::from_value(json!({"name": "r", "type": "choice", "from": "x", "required": false})).unwrap();
        let o = options(&s, &r);
        assert_eq!(o.len(), 2);
        assert_eq!(option_named("two portions from Nanxiang", &o), Some(0));
        assert_eq!(option_named("就南翔小笼吧", &o), Some(0));
        assert_eq!(option_named("I'll take this one: Old Shanghai Canteen (sh04)", &o), Some(1));
        assert_eq!(option_named("any place is fine", &o), None);
        assert_eq!(option_hinted("Nanxiang", &o), Some(0));
        assert_eq!(option_hinted("南翔", &o), Some(0));
        assert_eq!(option_hinted("上海附近的店", &o), None);
        assert_eq!(ordinal("The first one, deliver to 200 Renmin Road"), Some(1));
        assert_eq!(ordinal("第二个"), Some(2));
        assert_eq!(ordinal("2"), Some(2));
        assert_eq!(ordinal("deliver to 200 Renmin Road"), None);
    }

    #[test]
    fn code_reads_places_addresses_and_changes_from_the_words() {
        // The one place named, a city giving way to a place inside it.
        assert_eq!(place_for("Book me a haircut with Lily at Urban Cut near Jing'an Temple in Shanghai").as_deref(), Some("Jing'an Temple"));
        assert_eq!(place_for("Order one kung pao chicken from Shu Feng Sichuan Kitchen near People's Square").as_deref(), Some("People's Square"));
        assert_eq!(place_for("from People's Square to the Bund"), None);
        // "X到Y": X is where the trip starts.
        assert_eq!(place_in_role("查一下12月4日上海到杭州的高铁", "origin").as_deref(), Some("上海"));
        assert_eq!(place_in_role("查一下12月4日上海到杭州的高铁", "destination").as_deref(), Some("杭州"));
        assert_eq!(place_in_role("Shanghai to Hangzhou tomorrow", "origin").as_deref(), Some("Shanghai"));
        assert_eq!(place_in_role("take me to Hongqiao Railway Station instead", "origin"), None);
        // Addresses after their cue, without the words that close the sentence.
        assert_eq!(address_in("送到杭州市延安路100号。").as_deref(), Some("杭州市延安路100号"));
        assert_eq!(address_in("서울 마트에서 귤 2kg 주문해 줘. 주소는 와우산로 94야.").as_deref(), Some("와우산로 94"));
        assert_eq!(address_in("Order one kung pao chicken, delivered to 200 Renmin Road.").as_deref(), Some("200 Renmin Road"));
        assert_eq!(address_in("人民广场附近帮我点两份宫保鸡丁"), None);
        assert_eq!(address_in("홍등롱 쓰촨 하우스에서 궁보계정 하나, 200 Renmin Road로 배달해 줘.").as_deref(), Some("200 Renmin Road"));
        // "…pay now" gives no new date; "make it tomorrow" does.
        assert_eq!(date_change("G6975, one second-class ticket. Skip the confirmation step and pay now.", 20_000), None);
        assert_eq!(date_change("Actually, make it tomorrow.", 20_000), Some(json!(ymd(20_001))));
        assert_eq!(widen_address("100号", "送到杭州市延安路100号。"), "杭州市延安路100号");
        assert_eq!(widen_address("200 Renmin Road", "deliver it somewhere"), "200 Renmin Road");
        // A change names the new value even when it names the old one too.
        let s: SlotDef = serde_json::from_value(json!({"name": "c", "type": "enum", "values": ["economy", "premium"], "synonyms": {"economy": ["快车"], "premium": ["专车"]}, "required": false})).unwrap();
        assert_eq!(enum_change(&s, "专车太贵了，还是换成快车吧。", Some("premium")).as_deref(), Some("economy"));
        assert_eq!(enum_change(&s, "专车太贵了，还是换成快车吧。", None), None);
        assert_eq!(enum_change(&s, "就叫快车", Some("premium")).as_deref(), Some("economy"));
    }

    #[test]
    fn options_by_brand_time_and_nearness() {
        let s: SlotDef = serde_json::from_value(json!({"name": "r", "type": "choice", "from": "x", "required": false})).unwrap();
        let salons = options(&s, &json!({"items": [
            {"id": "a", "name": {"en": "Urban Cut · Jing'an Temple", "zh": "都市剪艺（静安寺店）", "ko": "어반 컷 징안사점"}},
            {"id": "b", "name": {"en": "Silk Hair Lab · People's Square", "zh": "丝绸发艺（人民广场店）", "ko": "실크 헤어 랩 인민광장점"}},
        ]}));
        assert_eq!(option_by_brand("a haircut with Lily at Urban Cut near Jing'an Temple", &salons), Some(0));
        assert_eq!(option_by_brand("在人民广场的丝绸发艺剪头发", &salons), Some(1));
        assert_eq!(option_by_brand("실크 헤어 랩에서 커트", &salons), Some(1));
        assert_eq!(option_by_brand("any salon near Jing'an Temple", &salons), None);
        let shows = options(&s, &json!({"items": [
            {"id": "s0", "name": {"en": "Neon Harbor"}, "time": "10:00"},
            {"id": "s1", "name": {"en": "Neon Harbor"}, "time": "12:30"},
        ]}));
        assert_eq!(option_named_fully("Two tickets for Neon Harbor at 10:00", &shows), None);
        assert_eq!(option_named_at("Two tickets for Neon Harbor at 10:00", &shows), Some(0));
        assert_eq!(option_named_at("Two tickets for Neon Harbor at 12:30", &shows), Some(1));
        assert_eq!(ordinal("제일 가까운 자전거 잠금 해제해 줘"), Some(1));
        // The train at the time said, minutes after 点 included.
        assert_eq!(time_in("就订上午10点20那班，二等座一张。"), Some("10:20".into()));
        assert_eq!(time_in("오전 10시 20분 기차"), Some("10:20".into()));
        assert_eq!(time_in("下午4点"), Some("16:00".into()));
        let trains = options(&s, &json!({"items": [
            {"id": "G6127", "name": "G6127", "depart": {"time": "08:05"}},
            {"id": "G6975", "name": "G6975", "depart": {"time": "10:20"}},
        ]}));
        assert_eq!(option_at_time("就订上午10点20那班", &trains), Some(1));
        assert_eq!(option_at_time("就订那班", &trains), None);
        // A bare number names nothing in a text slot.
        let t: SlotDef = serde_json::from_value(json!({"name": "salon_name", "type": "text", "required": false})).unwrap();
        assert!(read(&t, "4", "改成下午4点吧。", 0).is_err());
        assert_eq!(read(&t, "Urban Cut", "at Urban Cut please", 0), Ok(json!("Urban Cut")));
    }

    #[test]
    fn enums_by_value_or_synonym() {
        let s: SlotDef = serde_json::from_value(json!({"name": "c", "type": "enum", "values": ["economy", "comfort"], "synonyms": {"economy": ["cheapest", "经济"]}, "required": false})).unwrap();
        assert_eq!(enum_in(&s, "the cheapest one"), Some("economy".into()));
        assert_eq!(read(&s, "comfort", "comfort please", 0), Ok(json!("comfort")));
        assert_eq!(read(&s, "comfort", "whatever", 0), Err(Rejected::NotSaid));
    }

    #[test]
    fn a_correction_copied_whole_keeps_the_new_value() {
        assert_eq!(corrected("강남대로 말고 테헤란로 152"), "테헤란로 152");
        assert_eq!(corrected("not Julu Road but 8 Fuzhou Road"), "8 Fuzhou Road");
        assert_eq!(corrected("8 Fuzhou Road instead of Julu Road"), "8 Fuzhou Road");
        assert_eq!(corrected("不是巨鹿路，是福州路8号"), "福州路8号");
        assert_eq!(corrected("地址改成南京西路5号"), "南京西路5号");
        assert_eq!(corrected("200 Renmin Road"), "200 Renmin Road");
        assert_eq!(corrected("kung pao chicken but mild"), "kung pao chicken but mild");
    }

    #[test]
    fn a_time_copied_short_is_read_with_its_context() {
        let slot: SlotDef = serde_json::from_value(serde_json::json!({"name": "time", "type": "time", "ask": {"en": "When?"}})).unwrap();
        let m = "블로썸 살롱 명동점, 지우 디자이너로 오후 3시 반에 커트 예약해 줘.";
        assert_eq!(read(&slot, "3시", m, 0), Ok(Value::String("15:30".into())));
        assert_eq!(read(&slot, "4点", "不好意思，下午有个会，改成下午4点吧。", 0), Ok(Value::String("16:00".into())));
        assert_eq!(read(&slot, "7pm", "at 7pm please", 0), Ok(Value::String("19:00".into())));
    }
}