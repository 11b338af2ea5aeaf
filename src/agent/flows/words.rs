//! What code reads from the words, and the small rules the executor
//! shares: places by role, options by name, a message's part for a second
//! task, the slots a step reads, emptying a slot and what hangs on it.

use super::*;

/// Whether a message is only an answer of a few words ("2", "the first
/// one", "tomorrow", 第二个): such a message needs no model. Anything longer
/// may carry more (a quantity, an address) and goes to the model.
pub(super) fn short(text: &str) -> bool {
    let t = text.trim();
    t.split_whitespace().count() <= 3 && cities::fold(t).chars().count() <= if t.is_ascii() { 16 } else { 6 }
}

/// Whether the message is an option's name and little else ("Nanxiang", 南翔小笼吧).
pub(super) fn only_names(text: &str, o: &Opt) -> bool {
    let t = cities::fold(text);
    o.labels.iter().chain(std::iter::once(&o.id)).any(|l| {
        let l = cities::fold(l);
        !l.is_empty() && t.contains(&l) && t.chars().count() <= l.chars().count() + 3
    })
}

/// Whether `part` is a piece of `whole` (the "152" of "테헤란로 152"); a
/// longer value that holds a shorter one ("王府井大街1号" after the place
/// 王府井) is not.
pub(super) fn inside(part: &str, whole: &str) -> bool {
    let (p, w) = (part.trim().to_lowercase(), whole.trim().to_lowercase());
    !p.is_empty() && w.contains(&p)
}

/// How many of the person's messages a frame keeps ([`Frame::words`]).
pub(super) const WORDS_KEPT: usize = 6;

/// The place code reads for a place slot from the words: by its role
/// ("from X", "Y까지"), as the city a city slot wants, or the one place
/// named. `None` when the words do not settle it.
pub(super) fn code_place(d: &SlotDef, text: &str) -> Option<String> {
    if let Some(r) = &d.role {
        return value::place_in_role(text, r).map(|p| as_said(p, text));
    }
    if d.scope.as_deref() == Some("city") {
        let found = value::places_in(text);
        let city_of = |n: &str| cities::city(n).map(|c| c.id).or_else(|| cities::place(n, None).map(|(c, _)| c.id));
        let mut ids: Vec<&str> = found.iter().filter_map(|n| city_of(n)).collect();
        ids.dedup();
        if ids.len() != 1 {
            return None;
        }
        return found.iter().find(|n| cities::city(n).is_some()).or(found.first()).cloned().map(|p| as_said(p, text));
    }
    value::place_for(text).map(|p| as_said(p, text))
}

/// A name found in the words, as the person spelt it ("the Bund" for the
/// gazetteer's "The Bund", "Pudong Airport" for its alias "pudong airport").
pub(super) fn as_said(name: String, text: &str) -> String {
    let (lt, ln) = (text.to_lowercase(), name.to_lowercase());
    match lt.find(&ln) {
        Some(i) if lt.len() == text.len() => text.get(i..i + ln.len()).map(str::to_owned).unwrap_or(name),
        _ => name,
    }
}

/// The words without the flow's enum values ("second class" is no ordinal).
pub(super) fn without_enums(flow: &Flow, text: &str) -> String {
    let mut t = text.to_lowercase();
    for d in flow.def.slots.iter().filter(|d| d.kind == SlotKind::Enum) {
        for v in d.values.iter().chain(d.synonyms.values().flatten()) {
            let v = v.to_lowercase();
            if v.chars().count() >= 2 {
                t = t.replace(&v, " ");
                t = t.replace(&v.replace('_', " "), " ");
            }
        }
    }
    t
}

/// The part of a message about `app` when it also asks something of
/// `other`: its clauses from the first that names `app` (or one of its
/// flows' keywords) up to the next that names `other`. The whole message
/// when no clause names `app`.
pub(super) fn segment(tools: &crate::tools::ToolSet, text: &str, app: &str, other: &str) -> String {
    let names = |clause: &str, a: &str| {
        let lower = clause.to_lowercase();
        crate::agent::route::apps_named(tools, clause).iter().any(|x| x == a) || tools.flows().iter().any(|f| f.app == a && f.def.keywords.iter().any(|k| crate::agent::route::mentions(&lower, &k.to_lowercase())))
    };
    let mut out = String::new();
    let mut on = false;
    for clause in text.split_inclusive([',', '，', ';', '；', '。', '!', '！']) {
        if names(clause, app) {
            on = true;
        } else if names(clause, other) {
            on = false;
        }
        if on {
            out.push_str(clause);
        }
    }
    if out.trim().is_empty() {
        text.to_owned()
    } else {
        out
    }
}

/// A task started from another task's message: what code reads from its
/// part of the words (places, enum values, the date and time, a count, an
/// address); options it names are picked when their list comes.
pub(super) fn fill_from_words(flow: &Flow, fr: &mut Frame, text: &str, today: i64) {
    let address = flow.def.slots.iter().any(|d| d.address).then(|| value::address_in(text)).flatten();
    let rest = match &address {
        Some(a) => text.replace(a.as_str(), " "),
        None => text.to_owned(),
    };
    for d in &flow.def.slots {
        let v = match d.kind {
            SlotKind::Place => code_place(d, &rest).map(Value::String),
            SlotKind::Enum => value::enum_in(d, &rest).map(Value::String),
            SlotKind::Date | SlotKind::Time | SlotKind::Count => value::from_message(d, &rest, today),
            SlotKind::Text if d.address => address.clone().map(Value::String),
            _ => None,
        };
        if let Some(v) = v {
            fr.slots.insert(d.name.clone(), v);
        }
    }
    fr.words.push(text.to_owned());
}

/// Whether a value code checked (not free text) changed in this message
/// for the call whose results a choice slot lists.
pub(super) fn inputs_changed(flow: &Flow, d: &SlotDef, fresh: &[String]) -> bool {
    let src = flow.def.steps.iter().find(|st| st.name.is_some() && st.name.as_deref() == d.from.as_deref());
    src.map(step_slots).unwrap_or_default().iter().any(|k| fresh.contains(k) && flow.slot(k).is_some_and(|x| x.kind != SlotKind::Text))
}

pub(super) fn when_ok(w: &Option<When>, fr: &Frame) -> bool {
    let Some(w) = w else { return true };
    w.filled.iter().all(|s| fr.slots.contains_key(s))
        && w.missing.iter().all(|s| !fr.slots.contains_key(s))
        && w.is.iter().all(|(s, vals)| fr.slots.get(s).and_then(Value::as_str).is_some_and(|v| vals.iter().any(|x| x == v)))
}

/// Fills an argument template from the frame; `None` leaves it out.
pub(super) fn build(t: &Value, fr: &Frame) -> Option<Value> {
    match t {
        Value::String(s) if s.starts_with('$') => {
            let r = &s[1..];
            match r.split_once('.') {
                Some((slot, field)) => fr.chosen.get(slot).and_then(|o| o.get(field)).filter(|v| !v.is_null()).cloned(),
                None => fr.slots.get(r).cloned(),
            }
        }
        Value::Array(a) => Some(Value::Array(a.iter().filter_map(|x| build(x, fr)).collect())),
        Value::Object(o) => Some(Value::Object(o.iter().filter_map(|(k, v)| build(v, fr).map(|b| (k.clone(), b))).collect())),
        v => Some(v.clone()),
    }
}

pub(super) fn args_of(step: &Step, fr: &Frame) -> Map<String, Value> {
    step.args.iter().filter_map(|(k, v)| build(v, fr).map(|b| (k.clone(), b))).collect()
}

pub(super) fn step_name(step: &Step) -> String {
    step.name.clone().or_else(|| step.call.clone()).or_else(|| step.quote.clone()).unwrap_or_default()
}

/// The options a choice slot offers now: a step's results, or (`@orders`)
/// this session's orders with the flow's app, newest first.
pub(super) fn slot_options(orders: &[(String, Value)], flow: &Flow, fr: &Frame, slot: &SlotDef) -> Vec<Opt> {
    let Some(from) = &slot.from else { return Vec::new() };
    if from == crate::tools::flow::ORDERS {
        let items: Vec<Value> = orders.iter().rev().filter(|(app, _)| *app == flow.app).map(|(_, o)| o.clone()).collect();
        let mut sl = slot.clone();
        sl.list = Some("/items".into());
        return value::options(&sl, &json!({ "items": items }));
    }
    fr.results.get(from).map(|(_, r)| value::options(slot, r)).unwrap_or_default()
}

pub(super) fn choose(fr: &mut Frame, slot: &str, o: &Opt) {
    fr.slots.insert(slot.to_owned(), Value::String(o.id.clone()));
    fr.chosen.insert(slot.to_owned(), o.data.clone());
}

/// Empties a slot and the choices that depend on its words.
pub(super) fn clear(flow: &Flow, fr: &mut Frame, slot: &str) {
    fr.slots.remove(slot);
    fr.chosen.remove(slot);
    for s in &flow.def.slots {
        if s.hint.as_deref() == Some(slot) {
            fr.slots.remove(&s.name);
            fr.chosen.remove(&s.name);
        }
    }
}

/// The slots a step's arguments read.
pub(super) fn step_slots(step: &Step) -> Vec<String> {
    let mut r = Vec::new();
    crate::tools::flow::refs(&Value::Object(step.args.clone()), &mut r);
    r.into_iter().map(|(s, _)| s).collect()
}
