//! Grounding: every argument value the model puts in a tool call must come
//! from something the user said or a tool returned in this conversation.
//!
//! Small models invent dates, places, addresses and ids. Before a call runs,
//! each leaf value is looked up in the evidence (the user's messages and the
//! raw tool results):
//!
//! - text is found case- and punctuation-insensitively, or as a place or
//!   city whose name in any language (or alias) the evidence contains, so
//!   a model that writes "People's Square" for 人民广场 is fine;
//! - ids (`…_id` keys, path parameters) must appear verbatim;
//! - dates must be written in the evidence or follow from what the user
//!   said relative to today: "tomorrow", 明天, 내일, "Saturday", 周六,
//!   "11月23日", "Nov 23", …;
//! - times need their hour in the user's words ("7", "7pm", "19:00", 7点,
//!   7시) or a part of the day that contains them ("morning", 上午, 오전);
//! - numbers must be said (digits or a number word), except 1;
//! - booleans are always fine.
//!
//! Optional arguments that fail are dropped; required ones make the agent
//! ask the user instead of calling.

use crate::world::cities::{self, fold};
use crate::world::calendar::{civil_from_days, days_from_civil};
use serde_json::{Map, Value};

/// Keys whose values must be copied from a tool result (or the user's own
/// words), never composed: `…_id`, `…_code` and path parameters.
pub fn id_like(key: &str, path_params: &[&str]) -> bool {
    key.ends_with("_id") || key == "id" || key.ends_with("_code") || path_params.contains(&key)
}

/// What the conversation has established so far.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Evidence {
    /// The user's own words.
    pub user: Vec<String>,
    /// Raw tool results (JSON text).
    pub tools: Vec<String>,
    /// Today, as days since 1970-01-01 (UTC).
    pub today: i64,
    /// Parsed tool results with the app and tool that gave them, for ids.
    pub results: Vec<(String, String, Value)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The arguments with ungrounded optional values removed.
    pub args: Map<String, Value>,
    /// Optional arguments that were dropped: (name, value).
    pub dropped: Vec<(String, Value)>,
    /// Required arguments with no grounding: (name, value).
    pub missing: Vec<(String, Value)>,
    /// Dates replaced by the one day the user named: (name, was, now).
    pub repaired: Vec<(String, Value, Value)>,
}

impl Evidence {
    fn folded_all(&self) -> String {
        let mut s = String::new();
        for t in self.user.iter().chain(self.tools.iter()) {
            s.push_str(&fold(&unescape_json(t)));
            s.push('\u{1}');
        }
        s
    }

    /// Records a tool's answer.
    pub fn add_result(&mut self, app: &str, tool: &str, v: &Value) {
        self.tools.push(v.to_string());
        self.results.push((app.into(), tool.into(), v.clone()));
    }

    /// Forgets all but the newest `keep` messages and tool results, so a
    /// long session's evidence stays bounded.
    pub fn trim(&mut self, keep: usize) {
        for v in [&mut self.user, &mut self.tools] {
            let extra = v.len().saturating_sub(keep);
            v.drain(..extra);
        }
        let extra = self.results.len().saturating_sub(keep);
        self.results.drain(..extra);
    }

    /// The ids a parameter named `key` of an `app` tool can take: values
    /// returned under that very key; `id`s of objects in a list named after
    /// the entity (`dishes` for `dish_id`); and `id`s of the top-level
    /// `items` of a tool named after the entity (`food_search_restaurants`
    /// for `restaurant_id`), of listings that are no search (a menu), or of
    /// any listing when the key is as generic as `item_id`.
    pub fn id_candidates(&self, app: &str, key: &str) -> Vec<String> {
        let entity = key.strip_suffix("_id").or_else(|| key.strip_suffix("_code")).unwrap_or(key);
        let plurals = [format!("{entity}s"), format!("{entity}es")];
        let mut out: Vec<String> = Vec::new();
        fn walk(v: &Value, key: &str, plurals: &[String], out: &mut Vec<String>) {
            match v {
                Value::Object(o) => {
                    for (k, x) in o {
                        if k == key {
                            if let Some(s) = x.as_str() {
                                out.push(s.to_owned());
                            }
                        }
                        if plurals.iter().any(|p| p == k) {
                            for it in x.as_array().into_iter().flatten() {
                                if let Some(s) = it["id"].as_str() {
                                    out.push(s.to_owned());
                                }
                            }
                        }
                        walk(x, key, plurals, out);
                    }
                }
                Value::Array(a) => a.iter().for_each(|x| walk(x, key, plurals, out)),
                _ => {}
            }
        }
        for (a, tool, v) in &self.results {
            if a != app {
                continue;
            }
            walk(v, key, &plurals, &mut out);
            let is_search = ["search", "quote", "find"].iter().any(|w| tool.contains(w));
            let named = tool.contains(entity);
            if named || !is_search || entity == "item" {
                for it in v["items"].as_array().into_iter().flatten() {
                    if let Some(s) = it["id"].as_str() {
                        out.push(s.to_owned());
                    }
                }
            }
        }
        // A code is something the user reads off a thing (a bike's QR code).
        if key.ends_with("_code") {
            for u in &self.user {
                for w in u.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_')) {
                    if w.len() >= 3 && w.chars().any(|c| c.is_ascii_digit()) {
                        out.push(w.to_owned());
                    }
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        out.retain(|x| seen.insert(x.clone()));
        out
    }

    fn user_text(&self) -> String {
        self.user.join("\n")
    }

    /// Checks `args` of a tool whose JSON schema is `schema`.
    pub fn check(&self, schema: &Value, args: &Map<String, Value>, path_params: &[&str]) -> Verdict {
        let required: Vec<&str> = schema["required"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let folded = self.folded_all();
        let mut v = Verdict {
            args: Map::new(),
            dropped: Vec::new(),
            missing: Vec::new(),
            repaired: Vec::new(),
        };
        for (k, val) in args {
            // A count the user named outright wins over the model's.
            if let Some(n) = self.repair_count(k, val).filter(|n| n != val) {
                v.repaired.push((k.clone(), val.clone(), n.clone()));
                v.args.insert(k.clone(), n);
                continue;
            }
            let tidied = match val {
                Value::String(x) => Value::String(tidy(x)),
                other => other.clone(),
            };
            let val = &tidied;
            let prop = &schema["properties"][k];
            let id_like = id_like(k, path_params);
            let ok = self.grounded(k, val, prop, id_like, &folded);
            if ok {
                v.args.insert(k.clone(), val.clone());
            } else if let Some(n) = self.repair_count(k, val) {
                v.repaired.push((k.clone(), val.clone(), n.clone()));
                v.args.insert(k.clone(), n);
            } else if let Some(kept) = self.repair_parts(k, val, &folded) {
                // "200 Renmin Road, Huangpu, Shanghai, China" when the user
                // said "200 Renmin Road, Huangpu": the parts the model added
                // are dropped, what the user said is kept.
                v.repaired.push((k.clone(), val.clone(), kept.clone()));
                v.args.insert(k.clone(), kept);
            } else if let Some(day) = self.repair_date(val, prop) {
                // The model got the arithmetic wrong, but the user's words
                // name exactly one day ("tomorrow"): use that day.
                v.repaired.push((k.clone(), val.clone(), day.clone()));
                v.args.insert(k.clone(), day);
            } else if required.contains(&k.as_str()) {
                v.missing.push((k.clone(), val.clone()));
            } else {
                v.dropped.push((k.clone(), val.clone()));
            }
        }
        v
    }

    fn grounded(&self, key: &str, val: &Value, prop: &Value, id_like: bool, folded: &str) -> bool {
        match val {
            Value::Null | Value::Bool(_) => true,
            Value::Number(n) => {
                if id_like {
                    return folded.contains(&n.to_string());
                }
                let Some(x) = n.as_f64() else { return false };
                self.number_said(x) || (x == 1.0 && self.counts_said().is_empty())
            }
            Value::String(s) => self.string_grounded(key, s, prop, id_like, folded),
            Value::Array(items) => {
                let item_schema = &prop["items"];
                items.iter().all(|it| match it {
                    Value::Object(o) => o.iter().all(|(k, x)| {
                        let id = k.ends_with("_id") || k == "id";
                        self.grounded(k, x, &item_schema["properties"][k], id, folded)
                    }),
                    other => self.grounded(key, other, item_schema, id_like, folded),
                })
            }
            Value::Object(o) => o
                .iter()
                .all(|(k, x)| self.grounded(k, x, &prop["properties"][k], k.ends_with("_id"), folded)),
        }
    }

    fn string_grounded(&self, key: &str, s: &str, prop: &Value, id_like: bool, folded: &str) -> bool {
        if id_like {
            // Ids must be copied, not made up: the exact text must be there.
            return !s.trim().is_empty()
                && !s.chars().all(|c| c == '.')
                && self.user.iter().chain(self.tools.iter()).any(|t| t.contains(s));
        }
        let f = fold(s);
        if f.is_empty() {
            return true;
        }
        if folded.contains(&f) {
            return true;
        }
        let is_date = prop["format"] == "date" || parse_ymd(s).is_some();
        if is_date {
            return match parse_ymd(s) {
                Some(day) => self.dates_said().contains(&day),
                None => false,
            };
        }
        if let Some((h, m)) = parse_hm(s) {
            return self.time_said(h, m);
        }
        // A place or city named in another language or by an alias.
        if let Some((_, place)) = cities::place(s, None) {
            let mut names = place.name.all().into_iter().chain(place.aliases.iter().copied()).map(fold);
            // Only a value that *is* a place name, not text that merely contains one.
            if names.clone().any(|n| n == f) && names.any(|n| n.len() >= 2 && folded.contains(&n)) {
                return true;
            }
        }
        if let Some(city) = cities::city(s) {
            if city.name.all().into_iter().map(fold).any(|n| folded.contains(&n)) {
                return true;
            }
        }
        // Text assembled from grounded parts ("88 Nanjing Road, People's
        // Square, Shanghai") is grounded when every part is.
        let parts = segments(s);
        if parts.len() > 1 {
            return parts.iter().all(|p| self.string_grounded(key, p, &Value::Null, false, folded));
        }
        false
    }

    /// A comma-separated value whose first part is grounded, with the
    /// ungrounded parts removed (`None` when nothing would be removed or
    /// nothing grounded would remain).
    fn repair_parts(&self, key: &str, val: &Value, folded: &str) -> Option<Value> {
        let parts = segments(val.as_str()?);
        if parts.len() < 2 {
            return None;
        }
        let ok: Vec<bool> = parts.iter().map(|p| self.string_grounded(key, p, &Value::Null, false, folded)).collect();
        if !ok[0] || ok.iter().all(|x| *x) {
            return None;
        }
        let kept: Vec<&str> = parts.iter().zip(&ok).filter(|(_, g)| **g).map(|(p, _)| p.as_str()).collect();
        Some(Value::String(kept.join(", ")))
    }

    fn number_said(&self, x: f64) -> bool {
        let text = self.user_text().to_lowercase();
        let n = x as i64;
        if (n as f64) != x {
            return text.contains(&x.to_string());
        }
        if numbers_in(&text).contains(&n) {
            return true;
        }
        NUMBER_WORDS
            .iter()
            .filter(|(_, v)| *v == n)
            .any(|(w, _)| contains_word(&text, w))
    }

    /// Counts from 2 to 10 the user named, in digits standing alone or in
    /// words ("two", 两, 두).
    pub fn counts_said(&self) -> Vec<i64> {
        let text = self.user_text().to_lowercase();
        let mut out: Vec<i64> = NUMBER_WORDS
            .iter()
            .filter(|(w, n)| *n >= 2 && contains_word(&text, w))
            .map(|(_, n)| *n)
            .collect();
        // Digits count only as a word of their own ("2 tickets"), not inside
        // a time, a date, a price or an id ("06:25", "2026-11-23", "G6127").
        for w in text.split_whitespace() {
            let w = w.trim_matches(|c: char| matches!(c, ',' | '.' | '!' | '?' | '(' | ')' | '，' | '。'));
            if w.chars().all(|c| c.is_ascii_digit()) {
                if let Ok(n) = w.parse::<i64>() {
                    if (2..=10).contains(&n) {
                        out.push(n);
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// A count the model got wrong while the user named exactly one.
    fn repair_count(&self, key: &str, val: &Value) -> Option<Value> {
        if !val.is_number() || !matches!(key, "quantity" | "count" | "people" | "passengers" | "seats" | "tickets") {
            return None;
        }
        match self.counts_said().as_slice() {
            [n] => Some(Value::from(*n)),
            _ => None,
        }
    }

    fn repair_date(&self, val: &Value, prop: &Value) -> Option<Value> {
        let s = val.as_str()?;
        if prop["format"] != "date" && parse_ymd(s).is_none() {
            return None;
        }
        let mut days = self.dates_said();
        days.sort();
        days.dedup();
        // Weekdays give two candidates (this week's and next); only a single
        // unambiguous day is used.
        let [day] = days.as_slice() else { return None };
        let (y, m, d) = civil_from_days(*day);
        Some(Value::String(format!("{y:04}-{m:02}-{d:02}")))
    }

    /// Every date the user's words can mean, as days since the epoch.
    pub fn dates_said(&self) -> Vec<i64> {
        let text = self.user_text().to_lowercase();
        let today = self.today;
        let mut out = Vec::new();
        for (w, d) in [
            ("today", 0),
            ("tonight", 0),
            ("now", 0),
            ("今天", 0),
            ("今晚", 0),
            ("오늘", 0),
            ("tomorrow", 1),
            ("明天", 1),
            ("明早", 1),
            ("明晚", 1),
            ("내일", 1),
            ("day after tomorrow", 2),
            ("后天", 2),
            ("모레", 2),
        ] {
            // Latin words whole: "now" is not in "know" or "snow".
            if if w.is_ascii() { contains_word(&text, w) } else { text.contains(w) } {
                out.push(today + d);
            }
        }
        // Weekdays: the next such day (today counts), and the one after for "next".
        // 1970-01-01 was a Thursday: weekday index = (days + 3) % 7 with Monday = 0.
        let wd_today = (today + 3).rem_euclid(7);
        for (names, idx) in WEEKDAYS {
            if names.iter().any(|n| text.contains(n)) {
                let ahead = (idx - wd_today).rem_euclid(7);
                out.push(today + ahead);
                out.push(today + ahead + 7);
            }
        }
        // Explicit month/day in the user's words, this year or next.
        let (y, _, _) = civil_from_days(today);
        for (m, d) in month_days(&text) {
            for year in [y, y + 1] {
                if let Some(day) = days_from_civil(year, m, d) {
                    out.push(day);
                }
            }
        }
        for cap in ymd_in(&text) {
            out.push(cap);
        }
        out
    }

    fn time_said(&self, h: u32, m: u32) -> bool {
        let text = self.user_text().to_lowercase();
        let nums = numbers_in(&text);
        let hour_said = nums.contains(&(h as i64)) || (h > 12 && nums.contains(&(h as i64 - 12))) || (h == 12 && text.contains("noon"));
        let minute_ok = m == 0 || nums.contains(&(m as i64)) || (m == 30 && (text.contains("half") || text.contains('半') || text.contains('반')));
        if hour_said && minute_ok {
            return true;
        }
        // A part of the day the user named.
        for (words, lo, hi) in DAY_PARTS {
            if words.iter().any(|w| text.contains(w)) && (*lo..=*hi).contains(&h) {
                return true;
            }
        }
        false
    }
}

pub(crate) const DAY_PARTS: &[(&[&str], u32, u32)] = &[
    (&["morning", "上午", "早上", "早晨", "明早", "오전", "아침"], 5, 12),
    (&["noon", "中午", "점심"], 11, 14),
    (&["afternoon", "下午", "오후"], 12, 18),
    (&["evening", "tonight", "晚上", "今晚", "明晚", "傍晚", "저녁", "밤"], 17, 23),
];

const WEEKDAYS: [(&[&str], i64); 7] = [
    (&["monday", "周一", "星期一", "礼拜一", "월요일"], 0),
    (&["tuesday", "周二", "星期二", "礼拜二", "화요일"], 1),
    (&["wednesday", "周三", "星期三", "礼拜三", "수요일"], 2),
    (&["thursday", "周四", "星期四", "礼拜四", "목요일"], 3),
    (&["friday", "周五", "星期五", "礼拜五", "금요일"], 4),
    (&["saturday", "周六", "星期六", "礼拜六", "토요일"], 5),
    (&["sunday", "周日", "周天", "星期日", "星期天", "礼拜天", "일요일"], 6),
];

pub(crate) const NUMBER_WORDS: &[(&str, i64)] = &[
    ("one", 1), ("two", 2), ("three", 3), ("four", 4), ("five", 5), ("six", 6), ("seven", 7), ("eight", 8), ("nine", 9), ("ten", 10),
    ("a couple", 2), ("pair", 2), ("both", 2), ("twice", 2),
    ("一", 1), ("两", 2), ("二", 2), ("三", 3), ("四", 4), ("五", 5), ("六", 6), ("七", 7), ("八", 8), ("九", 9), ("十", 10),
    ("하나", 1), ("한", 1), ("둘", 2), ("두", 2), ("셋", 3), ("세", 3), ("넷", 4), ("네", 4), ("다섯", 5), ("여섯", 6),
];

/// The comma-separated parts of a value, repeats dropped.
fn segments(s: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for p in s.split([',', '，', '、', ';', '；']) {
        let p = p.trim();
        if !p.is_empty() && !out.iter().any(|o| fold(o) == fold(p)) {
            out.push(p.to_owned());
        }
    }
    out
}

/// A value with repeated parts removed: small models loop ("People's Square,
/// People's Square, …"); what goes to a service is each part once.
pub fn tidy(s: &str) -> String {
    let parts = segments(s);
    if parts.len() > 1 && s.split([',', '，', '、', ';', '；']).filter(|p| !p.trim().is_empty()).count() > parts.len() {
        parts.join(", ")
    } else {
        s.to_owned()
    }
}

pub(crate) fn contains_word(text: &str, w: &str) -> bool {
    if !w.is_ascii() {
        return text.contains(w);
    }
    text.match_indices(w).any(|(i, _)| {
        let before = text[..i].chars().next_back().is_none_or(|c| !c.is_ascii_alphabetic());
        let after = text[i + w.len()..].chars().next().is_none_or(|c| !c.is_ascii_alphabetic());
        before && after
    })
}

/// Runs of ASCII digits in `text`.
pub(crate) fn numbers_in(text: &str) -> Vec<i64> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() {
            cur.push(c);
        } else if !cur.is_empty() {
            if let Ok(n) = cur.parse() {
                out.push(n);
            }
            cur.clear();
        }
    }
    out
}

/// The model's dates, read loosely (`2026-12-9`) so that a sloppy one is
/// still checked against what was said.
fn parse_ymd(s: &str) -> Option<i64> {
    crate::world::calendar::parse_date_loose(s).ok()
}

fn parse_hm(s: &str) -> Option<(u32, u32)> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.get(..2)?.parse().ok()?);
    (h < 24 && m < 60).then_some((h, m))
}

fn ymd_in(text: &str) -> Vec<i64> {
    text.split(|c: char| !(c.is_ascii_digit() || c == '-'))
        .filter_map(parse_ymd)
        .collect()
}

/// "11月23日", "11월 23일", "nov 23", "23 november", "11/23".
fn month_days(text: &str) -> Vec<(u32, u32)> {
    const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let num_at = |i: usize| -> Option<(u32, usize)> {
        let mut j = i;
        while j < chars.len() && chars[j].is_ascii_digit() {
            j += 1;
        }
        if j == i || j - i > 2 {
            return None;
        }
        chars[i..j].iter().collect::<String>().parse().ok().map(|n| (n, j))
    };
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() && (i == 0 || !chars[i - 1].is_ascii_digit()) {
            if let Some((m, j)) = num_at(i) {
                let mut k = j;
                let sep = chars.get(k).copied();
                if matches!(sep, Some('月') | Some('월') | Some('/')) {
                    k += 1;
                    while chars.get(k) == Some(&' ') {
                        k += 1;
                    }
                    if let Some((d, _)) = num_at(k) {
                        out.push((m, d));
                    }
                }
            }
        }
        i += 1;
    }
    let words: Vec<&str> = text.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()).collect();
    for (wi, w) in words.iter().enumerate() {
        if let Some(mi) = MONTHS.iter().position(|m| w.starts_with(m)) {
            let month = mi as u32 + 1;
            for n in [wi.checked_sub(1), Some(wi + 1)].into_iter().flatten() {
                if let Some(d) = words.get(n).and_then(|x| x.trim_end_matches(|c: char| c.is_alphabetic()).parse::<u32>().ok()) {
                    out.push((month, d));
                }
            }
        }
    }
    out.retain(|&(m, d)| (1..=12).contains(&m) && (1..=31).contains(&d));
    out
}


/// Tool results are JSON text; names inside may be \u-escaped.
fn unescape_json(s: &str) -> String {
    match serde_json::from_str::<Value>(s) {
        Ok(v) => {
            let mut out = String::new();
            collect_strings(&v, &mut out);
            out
        }
        Err(_) => s.to_owned(),
    }
}

fn collect_strings(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push(' ');
        }
        Value::Number(n) => {
            out.push_str(&n.to_string());
            out.push(' ');
        }
        Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        Value::Object(o) => o.iter().for_each(|(k, x)| {
            out.push_str(k);
            out.push(' ');
            collect_strings(x, out)
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn evidence_keeps_only_the_newest() {
        let mut e = Evidence::default();
        for i in 0..100 {
            e.user.push(format!("said {i}"));
            e.add_result("food", "search", &serde_json::json!({"n": i}));
        }
        e.trim(10);
        assert_eq!((e.user.len(), e.tools.len(), e.results.len()), (10, 10, 10));
        assert_eq!(e.user.first().map(String::as_str), Some("said 90"));
        assert_eq!(e.results.last().map(|r| r.2["n"].clone()), Some(serde_json::json!(99)));
    }

    use super::*;
    use serde_json::json;

    fn ev(user: &[&str], tools: &[&str]) -> Evidence {
        Evidence {
            user: user.iter().map(|s| s.to_string()).collect(),
            tools: tools.iter().map(|s| s.to_string()).collect(),
            // 2026-11-22, a Sunday.
            today: days_from_civil(2026, 11, 22).unwrap(),
            results: Vec::new(),
        }
    }

    fn args(v: Value) -> Map<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "from": {"type": "string"}, "to": {"type": "string"},
            "date": {"type": "string", "format": "date"},
            "earliest": {"type": "string"}, "quantity": {"type": "integer"},
            "item_id": {"type": "string"}
        }, "required": ["from", "to", "date"]})
    }

    #[test]
    fn invented_dates_and_places_are_caught() {
        let e = ev(&["two train tickets from Shanghai to Hangzhou"], &[]);
        let v = e.check(&schema(), &args(json!({"from": "Shanghai", "to": "Hangzhou", "date": "2026-11-23", "quantity": 2})), &[]);
        assert_eq!(v.missing, vec![("date".to_string(), json!("2026-11-23"))]);
        assert!(v.args.contains_key("quantity"));
        let v = e.check(&schema(), &args(json!({"from": "Beijing", "to": "Hangzhou", "date": "2026-11-23"})), &[]);
        assert_eq!(v.missing.len(), 2, "{v:?}");
        // "tomorrow" names one day: a wrong date is corrected, not asked about.
        let e = ev(&["from Shanghai to Hangzhou tomorrow"], &[]);
        let v = e.check(&schema(), &args(json!({"from": "Shanghai", "to": "Hangzhou", "date": "2026-11-22"})), &[]);
        assert!(v.missing.is_empty(), "{v:?}");
        assert_eq!(v.args["date"], "2026-11-23");
        assert_eq!(v.repaired.len(), 1);
    }

    #[test]
    fn relative_dates_in_three_languages() {
        let tomorrow = json!({"from": "上海", "to": "杭州", "date": "2026-11-23"});
        for said in ["tickets from 上海 to 杭州 tomorrow morning", "明天上午从上海到杭州", "내일 上海 杭州"] {
            let v = ev(&[said], &[]).check(&schema(), &args(tomorrow.clone()), &[]);
            assert!(v.missing.is_empty(), "{said}: {v:?}");
        }
        // Saturday after Sunday 2026-11-22 is 2026-11-28.
        for said in ["shanghai to hangzhou on saturday", "周六 上海 杭州", "토요일 shanghai hangzhou", "shanghai hangzhou 11月28日", "shanghai hangzhou nov 28", "shanghai hangzhou 11/28"] {
            let v = ev(&[said], &[]).check(&schema(), &args(json!({"from": "shanghai", "to": "hangzhou", "date": "2026-11-28"})), &[]);
            assert!(v.missing.is_empty(), "{said}: {v:?}");
        }
    }

    #[test]
    fn translated_places_times_and_ids() {
        let e = ev(&["打车从人民广场去浦东机场，晚上7点"], &[r#"{"items":[{"id":"q_1f2e","class":"economy"}]}"#]);
        let s = json!({"type": "object", "properties": {"pickup": {"type": "string"}, "dropoff": {"type": "string"}, "pickup_time": {"type": "string"}, "quote_id": {"type": "string"}}, "required": ["dropoff"]});
        let v = e.check(&s, &args(json!({"pickup": "People's Square", "dropoff": "Pudong International Airport", "pickup_time": "19:00"})), &[]);
        assert!(v.missing.is_empty() && v.dropped.is_empty(), "{v:?}");
        let v = e.check(&s, &args(json!({"dropoff": "PVG", "pickup_time": "08:30"})), &[]);
        assert_eq!(v.dropped, vec![("pickup_time".to_string(), json!("08:30"))]);
        let v = e.check(&s, &args(json!({"dropoff": "PVG", "quote_id": "q_9999"})), &[]);
        assert_eq!(v.dropped.len(), 1, "an id nobody returned: {v:?}");
        let v = e.check(&s, &args(json!({"dropoff": "PVG", "quote_id": "q_1f2e"})), &[]);
        assert!(v.dropped.is_empty(), "{v:?}");
    }

    #[test]
    fn id_candidates_follow_the_entity() {
        let mut e = ev(&["ride to PVG, bike SH-0001"], &[]);
        e.add_result("food", "food_search_restaurants", &json!({"items": [
            {"id": "sh01", "dishes": [{"id": "sh01-kung-pao-chicken"}]},
            {"id": "sh02", "dishes": [{"id": "sh02-kung-pao-chicken"}]}
        ]}));
        e.add_result("ride", "ride_quote", &json!({"items": [{"id": "rq_1"}]}));
        e.add_result("food", "food_order_status", &json!({"order_id": "fo_9", "items": [{"dish_id": "sh01-kung-pao-chicken"}]}));
        assert_eq!(e.id_candidates("food", "restaurant_id"), vec!["sh01", "sh02"]);
        assert_eq!(e.id_candidates("food", "dish_id"), vec!["sh01-kung-pao-chicken", "sh02-kung-pao-chicken"]);
        assert_eq!(e.id_candidates("food", "order_id"), vec!["fo_9"]);
        assert_eq!(e.id_candidates("ride", "quote_id"), vec!["rq_1"]);
        assert!(e.id_candidates("ride", "restaurant_id").is_empty(), "ids stay within their app");
        assert_eq!(e.id_candidates("bike", "bike_code"), vec!["SH-0001"]);
    }

    #[test]
    fn assembled_and_looping_text_is_judged_by_its_parts() {
        let e = ev(&["deliver to 88 Nanjing Road near People's Square"], &[r#"{"city": "Shanghai"}"#]);
        let s = json!({"type": "object", "properties": {"address": {"type": "string"}}, "required": ["address"]});
        let v = e.check(&s, &args(json!({"address": "88 Nanjing Road, People's Square, Shanghai, People's Square, People's Square"})), &[]);
        assert!(v.missing.is_empty(), "{v:?}");
        assert_eq!(v.args["address"], "88 Nanjing Road, People's Square, Shanghai");
        // An invented part never reaches the service: it is cut off, and
        // the part the user said is what is sent.
        let v = e.check(&s, &args(json!({"address": "88 Nanjing Road, Room 1203"})), &[]);
        assert_eq!(v.args["address"], "88 Nanjing Road", "an invented part: {v:?}");
        assert_eq!(v.repaired.len(), 1);
    }

    #[test]
    fn parts_the_model_added_to_an_address_are_dropped() {
        let e = ev(&["Order kung pao chicken near People's Square, deliver to 200 Renmin Road, Huangpu"], &[]);
        let s = json!({"type": "object", "properties": {"address": {"type": "string"}}, "required": ["address"]});
        let v = e.check(&s, &args(json!({"address": "200 Renmin Road, Huangpu, People's Square, Shanghai, China"})), &[]);
        assert!(v.missing.is_empty(), "{:?}", v.missing);
        assert_eq!(v.args["address"], "200 Renmin Road, Huangpu, People's Square");
        assert_eq!(v.repaired.len(), 1);
        // An address the user never gave is still missing, not trimmed to a guess.
        let v = e.check(&s, &args(json!({"address": "Shanghai Tower, 501 Yincheng Road"})), &[]);
        assert_eq!(v.missing.len(), 1, "{:?}", v.args);
    }

    #[test]
    fn a_count_the_user_named_wins() {
        let e = ev(&["Two second class tickets from Shanghai to Hangzhou", "I'll take this one: G6127 · 06:25 · 1h00m · ¥73.00 (G6127@2026-11-23)"], &[]);
        let s = json!({"type": "object", "properties": {"quantity": {"type": "integer"}}, "required": ["quantity"]});
        let v = e.check(&s, &args(json!({"quantity": 1})), &[]);
        assert_eq!(v.args["quantity"], 2, "a 1 inside a picked option's text is no count: {v:?}");
        let e = ev(&["a ride to the airport"], &[]);
        assert!(e.check(&s, &args(json!({"quantity": 1})), &[]).missing.is_empty());
    }

    #[test]
    fn quantities_and_nested_items() {
        let e = ev(&["two kung pao chicken please, to 88 Nanjing Road"], &[r#"{"items":[{"id":"d_7","name":{"en":"Kung Pao Chicken"}}]}"#]);
        let s = json!({"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"dish_id": {"type": "string"}, "quantity": {"type": "integer"}}}}, "address": {"type": "string"}}, "required": ["items", "address"]});
        let v = e.check(&s, &args(json!({"items": [{"dish_id": "d_7", "quantity": 2}], "address": "88 Nanjing Road"})), &[]);
        assert!(v.missing.is_empty(), "{v:?}");
        let v = e.check(&s, &args(json!({"items": [{"dish_id": "d_7", "quantity": 3}], "address": "1 Main Street"})), &[]);
        assert_eq!(v.missing.len(), 2, "{v:?}");
    }
}
