//! The flow executor: runs the flows mini-programs declare, one message at
//! a time (see [`crate::dialogue`]).
//!
//! Code decides the order of steps, which id goes into which call, what is
//! asked next and what is confirmed. The model's commands only fill slots,
//! pick options, start, stop or switch flows, and every value it proposes
//! is checked against the person's words first. Money still moves only
//! through the gate: a flow's `quote` step opens a confirmation, and only
//! the person's Confirm with its token runs and pays it.

use super::{emit, present, Agent, AgentEvent, Session, Tx};
use crate::adapter::CallRequest;
use crate::dialogue::command::{self, Allowed, Command, SlotRule};
use crate::dialogue::generate::GenRequest;
use crate::dialogue::value::{self, Opt, Rejected};
use crate::dialogue::{say, Frame, Say};
use crate::prompt::Lang;
use crate::template::Message;
use crate::tools::flow::{Flow, SlotDef, SlotKind, Step, When};
use crate::world::cities;
use serde_json::{json, Map, Value};

/// How a frame's run ended for this message.
enum Outcome {
    /// A question was asked.
    Asked,
    /// A confirmation is open.
    Waiting,
    /// Every step ran (or an answer step ended it): the frame is done.
    Finished,
    /// A call failed or found nothing; the person was told.
    Stopped,
}

mod words;
use words::*;

impl Agent {
    fn flow(&self, id: &str) -> Option<Flow> {
        self.tools().flow(id).cloned()
    }

    /// Handles a message through flows. Returns `false` when it belongs to
    /// the generic tool-calling path (an app without flows).
    pub(super) async fn flow_turn(&self, sid: &str, s: &mut Session, lang: Lang, text: &str, tx: &Tx) -> Result<bool, String> {
        let today = self.opts.clock.now_s().div_euclid(86_400);
        // What needs no model: a tapped option, or a bare answer to the question just asked.
        let mut fresh: Vec<String> = Vec::new();
        let mut skip_model = false;
        if let Some(mut fr) = s.conv.dialogue.stack.pop() {
            if let (Some(flow), Some(asking)) = (self.flow(&fr.flow), fr.asking.clone()) {
                if let Some(def) = flow.slot(&asking).cloned() {
                    let tapped = s.conv.offered_replies.iter().find(|(r, _)| r == text.trim()).map(|(_, id)| id.clone());
                    match def.kind {
                        SlotKind::Choice => {
                            let opts = slot_options(&s.conv.orders, &flow, &fr, &def);
                            let pick = tapped
                                .and_then(|id| opts.iter().position(|o| o.id == id))
                                .or_else(|| short(text).then(|| value::ordinal(text).filter(|n| *n <= opts.len()).map(|n| n - 1)).flatten())
                                .or_else(|| opts.iter().position(|o| only_names(text, o)));
                            if let Some(i) = pick {
                                choose(&mut fr, &asking, &opts[i]);
                                fresh.push(asking.clone());
                                skip_model = true;
                            }
                        }
                        SlotKind::Count | SlotKind::Date | SlotKind::Time | SlotKind::Enum if short(text) => {
                            if let Some(v) = value::from_message(&def, text, today) {
                                fr.slots.insert(asking.clone(), v);
                                fresh.push(asking.clone());
                                skip_model = true;
                            }
                        }
                        _ => {}
                    }
                }
            }
            s.conv.dialogue.stack.push(fr);
        }
        s.conv.dialogue.note("user", text);
        if !skip_model {
            let handled = self.commands_turn(sid, s, lang, text, today, &mut fresh, tx).await?;
            if let Some(h) = handled {
                return Ok(h);
            }
        }
        if let Some(top) = s.conv.dialogue.stack.last_mut() {
            top.words.push(text.to_owned());
            let n = top.words.len();
            if n > WORDS_KEPT {
                top.words.drain(..n - WORDS_KEPT);
            }
        }
        self.run_stack(sid, s, lang, &fresh, text, tx).await?;
        Ok(true)
    }

    /// The model's commands for one message, applied. `Some(x)`: the turn is
    /// over (`x` false: hand it to the generic path).
    #[allow(clippy::too_many_arguments)]
    async fn commands_turn(&self, sid: &str, s: &mut Session, lang: Lang, text: &str, today: i64, fresh: &mut Vec<String>, tx: &Tx) -> Result<Option<bool>, String> {
        let tools = self.tools();
        let all = tools.flows();
        // Candidates: flows of the apps the message names, and those on the stack; all when none is named.
        let named = super::route::apps_named(&tools, text);
        // Candidates: the flows of the apps the message names (manifest
        // keywords), and those on the stack; when neither, the flows whose
        // examples share words with the message (often none: chat).
        let on_stack = |f: &Flow| s.conv.dialogue.stack.iter().any(|fr| fr.flow == f.def.id);
        let mut cands: Vec<&Flow> = all.iter().copied().filter(|f| named.contains(&f.app) || on_stack(f)).collect();
        // Within an app, the flows whose own words the message has ("refund",
        // 开锁, 취소) are its candidates; when none has them, all its flows are.
        let lower = text.to_lowercase();
        let pointed = |f: &Flow| f.def.keywords.iter().any(|k| super::route::mentions(&lower, &k.to_lowercase()));
        let apps_pointed: Vec<String> = cands.iter().filter(|f| pointed(f)).map(|f| f.app.clone()).collect();
        cands.retain(|f| on_stack(f) || !apps_pointed.contains(&f.app) || pointed(f));
        if cands.is_empty() {
            cands = crate::dialogue::similar(text, &all);
        }
        // Options on screen for the question being asked.
        let (options, n_options): (Vec<String>, usize) = match s.conv.dialogue.top().and_then(|fr| Some((fr, self.flow(&fr.flow)?))) {
            Some((fr, flow)) => match fr.asking.as_deref().and_then(|a| flow.slot(a)).filter(|d| d.kind == SlotKind::Choice) {
                Some(def) => {
                    let o = slot_options(&s.conv.orders, &flow, fr, def);
                    (o.iter().map(|o| o.labels.first().cloned().unwrap_or_else(|| o.id.clone())).collect(), o.len())
                }
                None => (Vec::new(), 0),
            },
            None => (Vec::new(), 0),
        };
        // An address the words give ("送到人民路200号") is the address
        // slots' only value, and no other slot's ("路200号" is no dish).
        let all_spans = command::spans(text);
        let address = value::address_in(text);
        let outside: Option<Vec<String>> = address.as_ref().map(|a| {
            let fa = cities::fold(a);
            all_spans.iter().filter(|x| !fa.contains(&cities::fold(x)) && !cities::fold(x).contains(&fa)).cloned().collect()
        });
        let mut slots: Vec<SlotRule> = Vec::new();
        for f in &cands {
            for d in &f.def.slots {
                if d.kind == SlotKind::Choice && d.hint.is_some() || slots.iter().any(|r| r.name == d.name) {
                    continue;
                }
                let free = !matches!(d.kind, SlotKind::Enum | SlotKind::Count);
                slots.push(SlotRule {
                    name: d.name.clone(),
                    values: (d.kind == SlotKind::Enum).then(|| d.values.clone()),
                    digits: d.kind == SlotKind::Count,
                    spans: match (&address, free, d.address) {
                        (Some(a), true, true) => Some(vec![a.clone()]),
                        (Some(_), true, false) => outside.clone(),
                        _ => None,
                    },
                });
            }
        }
        // Flows may be started when the message names their app, or when none
        // runs; a running flow is only resumed by name.
        let idle_unnamed = named.is_empty() && s.conv.dialogue.stack.is_empty();
        let startable: Vec<String> = cands.iter().filter(|f| named.contains(&f.app) || idle_unnamed).map(|f| f.def.id.clone()).collect();
        let allowed = Allowed { flows: startable, slots, options: n_options, active: !s.conv.dialogue.stack.is_empty() && crate::dialogue::says_stop(text), spans: all_spans, busy: !s.conv.dialogue.stack.is_empty() };
        let prompt = crate::dialogue::command_prompt(&cands, &s.conv.dialogue, &options, text);
        let req = GenRequest {
            session: Some(format!("{sid}#commands")),
            messages: vec![Message::system(crate::dialogue::COMMAND_SYSTEM.to_owned()), Message::user(prompt)],
            grammar: Some(command::grammar(&allowed)),
            max_tokens: 64,
            sampling: crate::engine::sampler::SamplingParams::greedy(),
            lang: lang.code().into(),
        };
        let g = self.generator.generate(req, None).await?;
        self.count(s, &g);
        let cmds = command::parse(&g.text);
        self.audit_row(sid, "model", "commands", None, json!({"commands": cmds, "prompt_tokens": g.prompt_tokens}), "read")?;
        let (mut chat, mut cannot, mut acted) = (false, false, false);
        let mut clarify: Option<Vec<String>> = None;
        let mut problems: Vec<String> = Vec::new();
        let mut started: Vec<String> = Vec::new();
        let mut unknown: Vec<String> = Vec::new();
        // Text and place values taken from this message so far.
        let mut taken: Vec<(SlotKind, String)> = Vec::new();
        if std::env::var_os("ERRAND_TRACE_COMMANDS").is_some() {
            eprintln!("[commands] {sid} {text:?} -> {:?}", g.text);
        }
        // The slots as they were, to put back a value the words contradict.
        let before: std::collections::BTreeMap<String, std::collections::BTreeMap<String, Value>> = s.conv.dialogue.stack.iter().map(|f| (f.flow.clone(), f.slots.clone())).collect();
        for c in cmds {
            match c {
                Command::Start { flow } => {
                    let Some(f) = self.flow(&flow) else { continue };
                    acted = true;
                    match s.conv.dialogue.stack.iter().position(|fr| fr.flow == flow) {
                        Some(i) if i + 1 == s.conv.dialogue.stack.len() => {}
                        Some(i) => {
                            let fr = s.conv.dialogue.stack.remove(i);
                            s.conv.dialogue.stack.push(fr);
                        }
                        None => {
                            let mut fr = Frame::new(&f);
                            // What the last answer of this app established (the trip
                            // just priced) carries into its next task.
                            if let Some(c) = s.conv.dialogue.carried.remove(&f.app) {
                                for (k, v) in c {
                                    if f.slot(&k).is_some_and(|d| d.kind != SlotKind::Choice) {
                                        fr.slots.insert(k, v);
                                    }
                                }
                            }
                            s.conv.dialogue.stack.push(fr);
                            started.push(flow);
                        }
                    }
                }
                Command::Set { slot, value: v } => {
                    // The newest frame that has the slot.
                    let Some(i) = s.conv.dialogue.stack.iter().rposition(|fr| self.flow(&fr.flow).is_some_and(|f| f.slot(&slot).is_some())) else { continue };
                    // A message that starts a task fills that task, not one below it.
                    if !started.is_empty() && !started.contains(&s.conv.dialogue.stack[i].flow) {
                        continue;
                    }
                    let flow = self.flow(&s.conv.dialogue.stack[i].flow).expect("checked above");
                    let def = flow.slot(&slot).expect("checked above").clone();
                    let fr = &mut s.conv.dialogue.stack[i];
                    // "…pay now" names no new day for a date already set.
                    if def.kind == SlotKind::Date && fr.slots.contains_key(&slot) && value::date_change(text, today).is_none() {
                        continue;
                    }
                    if def.kind == SlotKind::Choice {
                        let opts = slot_options(&s.conv.orders, &flow, fr, &def);
                        if let Some(k) = value::option_named(&v, &opts).or_else(|| value::option_named(text, &opts)) {
                            choose(fr, &slot, &opts[k]);
                            fresh.push(slot);
                            acted = true;
                        }
                        continue;
                    }
                    match value::read(&def, &v, text, today) {
                        // A count of one needs no saying for an empty slot, but
                        // it does not replace a count already given.
                        Ok(Value::Number(n)) if n.as_i64() == Some(1) && fr.slots.contains_key(&slot) && !value::counts_in(text).contains(&1) => {}
                        // One stretch of the words fills one slot: "152" of the
                        // address just taken is no dish.
                        Ok(Value::String(x)) if taken.iter().any(|(k, t)| (def.kind == SlotKind::Text || *k == SlotKind::Text) && inside(&x, t)) => {
                            self.audit_row(sid, "model", "slot", None, json!({"slot": slot, "value": x, "rejected": "already taken for another slot"}), "not taken")?;
                        }
                        Ok(val) => {
                            // An address copied in part is the whole address the words give.
                            let val = match (&val, def.address) {
                                (Value::String(x), true) => Value::String(value::widen_address(x, text)),
                                _ => val,
                            };
                            if let (Value::String(x), SlotKind::Text | SlotKind::Place) = (&val, def.kind) {
                                taken.push((def.kind, x.clone()));
                            }
                            if fr.slots.get(&slot) != Some(&val) {
                                clear(&flow, fr, &slot);
                                fr.slots.insert(slot.clone(), val);
                            }
                            fresh.push(slot);
                            acted = true;
                        }
                        // A place already known (said before, or just now) stays; the
                        // unknown name was likely meant for another slot.
                        // A known place the words name for the slot (People's Square in
                        // "from Shu Feng Sichuan Kitchen near People's Square") is read by
                        // code below; only a name with nothing known for it is unknown.
                        Err(Rejected::UnknownPlace(p)) if code_place(&def, text).is_some_and(|c| def.scope.is_some() || !cities::fold(&p).contains(&cities::fold(&c))) => {
                            self.audit_row(sid, "model", "slot", None, json!({"slot": slot, "value": p, "rejected": "not a known place; the words name another"}), "not taken")?;
                        }
                        Err(Rejected::UnknownPlace(p)) if !fr.slots.contains_key(&slot) => {
                            problems.push(say(lang, Say::UnknownPlace(&p)));
                            unknown.push(p);
                            acted = true;
                        }
                        Err(e) => {
                            self.audit_row(sid, "model", "slot", None, json!({"slot": slot, "value": v, "rejected": format!("{e:?}")}), "not taken")?;
                        }
                    }
                }
                Command::Pick { n } => {
                    let Some(fr) = s.conv.dialogue.stack.last_mut() else { continue };
                    let Some(flow) = self.flow(&fr.flow) else { continue };
                    let Some(def) = fr.asking.as_deref().and_then(|a| flow.slot(a)).filter(|d| d.kind == SlotKind::Choice).cloned() else { continue };
                    let opts = slot_options(&s.conv.orders, &flow, fr, &def);
                    // An option named in full in the words wins over the model's number,
                    // and of several with that name, the one at the time said.
                    let n = value::option_named_fully(text, &opts).or_else(|| value::option_named_at(text, &opts)).map(|i| i + 1).unwrap_or(n);
                    if let Some(o) = opts.get(n - 1) {
                        choose(fr, &def.name, o);
                        fresh.push(def.name.clone());
                        acted = true;
                    }
                }
                Command::Cancel => acted |= self.cancel_top(sid, s, lang, tx).await?,
                Command::Clarify { flows } => clarify = Some(flows),
                Command::Chat => chat = true,
                Command::CannotHandle => cannot = true,
            }
        }
        // Code reads what it can read exactly, for the flow on top: it fills
        // what the model left out and wins where the model read the words
        // otherwise (a place, an enum value, a date, a time, an option named).
        //
        // Two tasks in one message ("两件事：一是…；二是…", "…, and order …"):
        // the model starts one; the one flow of another app the words name
        // (by its keywords) waits below it, filled from its own part of the
        // words, and each task reads only its part.
        let second: Option<Flow> = match started.as_slice() {
            [one] => {
                let first_app = self.flow(one).map(|f| f.app.clone()).unwrap_or_default();
                // Apps named by their keywords or by a flow's own words (二等座).
                let mut apps: Vec<String> = named.iter().cloned().chain(all.iter().filter(|f| pointed(f)).map(|f| f.app.clone())).filter(|a| *a != first_app && tools.has_flows(a)).collect();
                apps.sort();
                apps.dedup();
                let per_app: Vec<&Flow> = apps
                    .iter()
                    .filter_map(|a| {
                        let fs: Vec<&Flow> = all.iter().copied().filter(|f| &f.app == a && !s.conv.dialogue.stack.iter().any(|fr| fr.flow == f.def.id)).collect();
                        let fs = if fs.len() > 1 { fs.into_iter().filter(|f| pointed(f)).collect() } else { fs };
                        match fs.as_slice() {
                            [f] => Some(*f),
                            _ => None,
                        }
                    })
                    .collect();
                match per_app.as_slice() {
                    [f] => Some((*f).clone()),
                    _ => None,
                }
            }
            _ => None,
        };
        let reading: String = match (&second, s.conv.dialogue.top()) {
            (Some(f2), Some(top)) => segment(&tools, text, &top.app, &f2.app),
            _ => text.to_owned(),
        };
        if let Some(f2) = &second {
            let mut fr2 = Frame::new(f2);
            let part = segment(&tools, text, &f2.app, &s.conv.dialogue.top().map(|t| t.app.clone()).unwrap_or_default());
            fill_from_words(f2, &mut fr2, &part, today);
            self.audit_row(sid, "system", "second_task", None, json!({"flow": f2.def.id, "words": part, "slots": fr2.slots}), "waits below")?;
            let n = s.conv.dialogue.stack.len();
            s.conv.dialogue.stack.insert(n.saturating_sub(1), fr2);
        }
        if let Some(mut top) = s.conv.dialogue.stack.pop() {
            let fr = &mut top;
            if let Some(flow) = self.flow(&fr.flow) {
                let new = started.contains(&fr.flow);
                let was = before.get(&fr.flow).cloned().unwrap_or_default();
                let asking = fr.asking.clone();
                let asked = |d: &SlotDef| asking.as_deref() == Some(d.name.as_str());
                let set = |fr: &mut Frame, fresh: &mut Vec<String>, d: &SlotDef, v: Value| {
                    if fr.slots.get(&d.name) != Some(&v) {
                        clear(&flow, fr, &d.name);
                        fr.slots.insert(d.name.clone(), v);
                    }
                    if !fresh.contains(&d.name) {
                        fresh.push(d.name.clone());
                    }
                };
                // The address, from the words after its cue ("送到…", "주소는…").
                // (Any message with an address cue gives the address: "地址是…".)
                for d in flow.def.slots.iter().filter(|d| d.address) {
                    if fr.slots.contains_key(&d.name) {
                        continue;
                    }
                    if let Some(a) = value::address_in(&reading) {
                        set(fr, fresh, d, Value::String(a));
                        acted = true;
                    }
                }
                // The rest of the words: without the text just given ("10 Fuzhou Road"
                // holds no count, "王府井大街138号" no place to deliver near).
                let mut rest = reading.clone();
                for k in fresh.iter() {
                    if let (Some(Value::String(v)), Some(SlotKind::Text)) = (fr.slots.get(k), flow.slot(k).map(|d| d.kind)) {
                        rest = rest.replace(v.as_str(), " ");
                    }
                }
                // A known name inside an unknown one (上海 in 上海欢乐谷) is not said by itself.
                for u in &unknown {
                    rest = rest.replace(u.as_str(), " ");
                }
                let places = value::places_in(&rest);
                let place_slots = flow.def.slots.iter().filter(|d| d.kind == SlotKind::Place).count();
                // "Make it three": the one count slot, changed by the one count said,
                // when the model left it alone.
                let counts: Vec<&SlotDef> = flow.def.slots.iter().filter(|d| d.kind == SlotKind::Count).collect();
                // The model's "1" where the words say another count ("2公斤香蕉"):
                // one needs no saying, so the count said wins.
                if let [d] = counts.as_slice() {
                    if fresh.contains(&d.name) && fr.slots.get(&d.name) == Some(&Value::from(1)) && !value::counts_in(&rest).contains(&1) {
                        if let Some(n) = value::from_message(d, &rest, today) {
                            fr.slots.insert(d.name.clone(), n);
                        }
                    }
                }
                if let ([d], false) = (counts.as_slice(), fresh.contains(&counts.first().map(|d| d.name.clone()).unwrap_or_default())) {
                    if let (Some(Value::Number(old)), Some(Value::Number(n))) = (fr.slots.get(&d.name).cloned(), value::from_message(d, &rest, today)) {
                        if old != n && n.as_i64() != Some(1) {
                            set(fr, fresh, d, Value::Number(n));
                            acted = true;
                        }
                    }
                }
                for d in &flow.def.slots {
                    let cur = fr.slots.get(&d.name).cloned();
                    let is_fresh = fresh.contains(&d.name);
                    let of_kind = flow.def.slots.iter().filter(|x| x.kind == d.kind).count();
                    let v: Option<Value> = match d.kind {
                        // Places: by role, city or the one named; the question just asked
                        // takes the one place the answer names.
                        SlotKind::Place => {
                            let code = code_place(d, &rest).or_else(|| (asked(d) && places.len() == 1 && unknown.is_empty()).then(|| as_said(places[0].clone(), &rest)));
                            match code {
                                // The words' role ("to Y") changes a place any time; a place
                                // named alone fills an empty slot or replaces what the model
                                // made of it, but changes nothing by itself ("강남대로 말고…"
                                // names 강남 in passing).
                                Some(c) if d.role.is_some() || is_fresh || asked(d) || cur.is_none() && (new || place_slots == 1) => Some(Value::String(c)),
                                _ => {
                                    // The model's place is not one the words name as such ("Bund.
                                    // Economy"), or is the one they give the other role: put
                                    // back what was there.
                                    let other = d.role.as_deref().map(|r| if r == "origin" { "destination" } else { "origin" });
                                    let cur_s = cur.as_ref().and_then(Value::as_str).unwrap_or_default();
                                    let contradicted = other.and_then(|o| value::place_in_role(&rest, o)).is_some_and(|o| cities::fold(&o) == cities::fold(cur_s));
                                    let loose = !places.iter().any(|p| cities::fold(p) == cities::fold(cur_s)) && code_place(d, text).is_none() && !places.is_empty();
                                    if is_fresh && (contradicted || loose) {
                                        match was.get(&d.name) {
                                            Some(old) => fr.slots.insert(d.name.clone(), old.clone()),
                                            None => fr.slots.remove(&d.name),
                                        };
                                        fresh.retain(|k| k != &d.name);
                                        self.audit_row(sid, "model", "slot", None, json!({"slot": d.name, "value": cur_s, "rejected": "the words give that place another role or name another place"}), "not taken")?;
                                    }
                                    None
                                }
                            }
                        }
                        // Enum values by their words: a change names the new value
                        // ("还是换成快车吧" while premium: economy).
                        // The value before this message is what a change is from (the
                        // model may have written the new one already).
                        // An optional filter already set changes only when the words
                        // contrast two values or the model changed it too ("공연"
                        // alone does not turn a concert search into a show search).
                        SlotKind::Enum => {
                            let base = was.get(&d.name).and_then(Value::as_str);
                            let contrast = base.is_some() && value::enums_named(d, &rest).len() == 2;
                            value::enum_change(d, &rest, base).map(Value::String).filter(|_| match &cur {
                                Some(_) => d.required || contrast || is_fresh || asked(d),
                                None => d.required || new || asked(d) || is_fresh,
                            })
                        }
                        // The flow's one date or time: read when missing, and a new one
                        // said ("改成下午4点吧") is a correction.
                        SlotKind::Date | SlotKind::Time if of_kind == 1 => match (&cur, value::from_message(d, &rest, today)) {
                            (None, Some(v)) if d.required || new || asked(d) => Some(v),
                            (Some(_), Some(v)) if !is_fresh && (d.kind == SlotKind::Time || value::date_change(&rest, today).is_some()) => Some(v),
                            _ => None,
                        },
                        SlotKind::Date | SlotKind::Time if cur.is_none() && (d.required || new || asked(d)) => value::from_message(d, &rest, today),
                        SlotKind::Count if cur.is_none() && (new || asked(d)) => value::from_message(d, &rest, today),
                        // The option the words name, by name, brand or place in the list.
                        // Not from a list whose inputs just changed: the new list comes next.
                        SlotKind::Choice if cur.is_none() && asked(d) && !inputs_changed(&flow, d, fresh) => {
                            let opts = slot_options(&s.conv.orders, &flow, fr, d);
                            let i = value::option_named(text, &opts)
                                .or_else(|| value::option_by_brand(text, &opts))
                                .or_else(|| value::ordinal(&without_enums(&flow, text)).filter(|n| *n <= opts.len()).map(|n| n - 1))
                                .or_else(|| value::option_at_time(text, &opts));
                            i.map(|i| {
                                fr.chosen.insert(d.name.clone(), opts[i].data.clone());
                                Value::String(opts[i].id.clone())
                            })
                        }
                        SlotKind::Text if cur.is_none() && asked(d) && !chat && text.chars().count() <= 120 && !text.trim_end().ends_with(['?', '？']) => {
                            Some(Value::String(if d.address { value::address_in(text).unwrap_or_else(|| text.trim().to_owned()) } else { text.trim().to_owned() }))
                        }
                        _ => None,
                    };
                    if let Some(v) = v {
                        if cur.as_ref() != Some(&v) {
                            if d.kind == SlotKind::Choice {
                                fr.slots.insert(d.name.clone(), v);
                                fresh.push(d.name.clone());
                            } else {
                                set(fr, fresh, d, v);
                            }
                            acted = true;
                        }
                    }
                }
                // An option picked from the list on screen: what the model changed in
                // the words that made the list ("query 2" of "첫 번째 공연으로 2장")
                // would replace the list, so it is put back.
                if let Some(d) = asking.as_deref().and_then(|a| flow.slot(a)).filter(|d| d.kind == SlotKind::Choice && fresh.contains(&d.name) && fr.slots.contains_key(&d.name)) {
                    let src = flow.def.steps.iter().find(|st| st.name.is_some() && st.name.as_deref() == d.from.as_deref());
                    for sl in src.map(step_slots).unwrap_or_default() {
                        if fresh.contains(&sl) && flow.slot(&sl).is_some_and(|x| x.kind == SlotKind::Text) {
                            match was.get(&sl) {
                                Some(old) => fr.slots.insert(sl.clone(), old.clone()),
                                None => fr.slots.remove(&sl),
                            };
                            fresh.retain(|k| k != &sl);
                        }
                    }
                }
            }
            s.conv.dialogue.stack.push(top);
        }
        // An unknown name in the other task's part is not this task's problem.
        let mut told: Vec<String> = Vec::new();
        for (p, name) in problems.iter().zip(unknown.iter()) {
            if !reading.contains(name.as_str()) || told.contains(p) {
                continue;
            }
            told.push(p.clone());
            self.tell(s, tx, p.clone()).await;
        }
        // "Then don't order it": the words say stop and the model found
        // nothing else in them, yet wrote only chat. The task ends.
        if !acted && clarify.is_none() && crate::dialogue::says_stop_firmly(text) {
            acted = self.cancel_top(sid, s, lang, tx).await?;
        }
        if let (Some(fs), false) = (&clarify, acted) {
            let ds: Vec<String> = fs.iter().filter_map(|f| self.flow(f)).map(|f| f.def.description.get(lang.code()).to_owned()).collect();
            if ds.len() >= 2 {
                let t = say(lang, Say::Clarify(ds.iter().map(String::as_str).collect()));
                self.tell(s, tx, t).await;
                return Ok(Some(true));
            }
        }
        if !acted {
            // A question about what was just said ("刚才那单没有下吧？") is
            // answered, even when no task can do it.
            let follow_up = text.trim_end().ends_with(['?', '？']) && s.conv.dialogue.recent.iter().rev().skip(1).take(2).any(|(r, _)| r == "assistant");
            if cannot && !chat && !follow_up {
                // A request for an app without flows goes to plain tool calling.
                if named.iter().any(|a| !tools.has_flows(a)) {
                    return Ok(Some(false));
                }
                let t = say(lang, Say::CannotHandle);
                self.tell(s, tx, t).await;
                return Ok(Some(true));
            }
            self.chat_reply(sid, s, lang, text, tx).await?;
            // A flow in progress resumes: its question (or quote) again.
            return Ok(if s.conv.dialogue.stack.is_empty() { Some(true) } else { None });
        }
        Ok(None)
    }

    /// Ends the task on top of the stack and any confirmation it opened,
    /// and says so. `false` when no task runs.
    async fn cancel_top(&self, sid: &str, s: &mut Session, lang: Lang, tx: &Tx) -> Result<bool, String> {
        let Some(fr) = s.conv.dialogue.stack.pop() else { return Ok(false) };
        self.drop_pending(sid, s, "the person cancelled the task")?;
        let d = self.flow(&fr.flow).map(|f| f.def.description.get(lang.code()).to_owned()).unwrap_or(fr.flow.clone());
        let t = say(lang, Say::Cancelled(&d));
        self.tell(s, tx, t).await;
        Ok(true)
    }

    /// Runs the top frame until it needs the person; a finished frame is
    /// popped and the one below resumes.
    pub(super) async fn run_stack(&self, sid: &str, s: &mut Session, lang: Lang, fresh: &[String], said: &str, tx: &Tx) -> Result<(), String> {
        let mut resumed = false;
        while let Some(mut fr) = s.conv.dialogue.stack.pop() {
            let Some(flow) = self.flow(&fr.flow) else { continue };
            if resumed {
                let t = say(lang, Say::Resume(flow.def.description.get(lang.code())));
                self.tell(s, tx, t).await;
            }
            let out = self.advance(sid, s, lang, &flow, &mut fr, fresh, if resumed { "" } else { said }, tx).await?;
            match out {
                Outcome::Finished => {
                    if fr.results.values().next().is_some() && flow.def.steps.iter().all(|st| st.quote.is_none()) {
                        let kept: std::collections::BTreeMap<String, Value> = fr.slots.iter().filter(|(k, _)| !fr.chosen.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
                        s.conv.dialogue.carried.insert(fr.app.clone(), kept);
                    }
                    resumed = true;
                    continue;
                }
                Outcome::Asked | Outcome::Waiting | Outcome::Stopped => {
                    s.conv.dialogue.stack.push(fr);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The frame's steps in order, from the first, until one needs the person.
    #[allow(clippy::too_many_arguments)]
    async fn advance(&self, sid: &str, s: &mut Session, lang: Lang, flow: &Flow, fr: &mut Frame, fresh: &[String], said: &str, tx: &Tx) -> Result<Outcome, String> {
        fr.asking = None;
        // Lists the person saw before this message.
        let shown_before = fr.shown.len();
        for step in &flow.def.steps {
            if !when_ok(&step.when, fr) {
                continue;
            }
            if let Some(c) = &step.collect {
                let def = flow.slot(c).expect("validated at load").clone();
                if def.kind == SlotKind::Choice {
                    let from = def.from.clone().unwrap_or_default();
                    if from != crate::tools::flow::ORDERS && !fr.results.contains_key(&from) {
                        // Its call was skipped by a condition.
                        continue;
                    }
                    let opts = slot_options(&s.conv.orders, flow, fr, &def);
                    if let Some(v) = fr.slots.get(c).and_then(Value::as_str) {
                        if let Some(o) = opts.iter().find(|o| o.id == v) {
                            fr.chosen.insert(c.clone(), o.data.clone());
                            continue;
                        }
                        fr.slots.remove(c);
                        fr.chosen.remove(c);
                    }
                    if opts.is_empty() && from == crate::tools::flow::ORDERS {
                        let t = say(lang, Say::NothingToCancel);
                        self.tell(s, tx, t).await;
                        return Ok(Outcome::Finished);
                    }
                    if opts.is_empty() {
                        let t = say(lang, Say::NothingFound);
                        self.tell(s, tx, t).await;
                        // What the person just said led nowhere: let them say it again.
                        let from_step = flow.def.steps.iter().find(|st| st.name.as_deref() == Some(from.as_str()));
                        for sl in from_step.map(step_slots).unwrap_or_default() {
                            if fresh.contains(&sl) {
                                clear(flow, fr, &sl);
                            }
                        }
                        return Ok(Outcome::Stopped);
                    }
                    if let Some(h) = def.hint.as_ref().and_then(|h| fr.slots.get(h)).and_then(Value::as_str) {
                        if let Some(i) = value::option_hinted(h, &opts) {
                            choose(fr, c, &opts[i]);
                            continue;
                        }
                    }
                    // The person named one of them: in this message, or, before the
                    // list was first shown, in an earlier one to this task ("from Shu
                    // Feng", "南翔小笼", "블로썸 살롱" for 블로썸 살롱 명동점).
                    let listed = fr.shown[..shown_before].iter().any(|k| k.starts_with(&format!("{from} ")));
                    let texts: Vec<String> = if listed { vec![said.to_owned()] } else { fr.words.iter().rev().cloned().collect() };
                    let at_time = (!said.is_empty()).then(|| value::option_at_time(said, &opts)).flatten();
                    if let Some(i) = texts.iter().filter(|t| !t.is_empty()).find_map(|t| value::option_named_fully(t, &opts).or_else(|| value::option_by_brand(t, &opts))).or(at_time) {
                        choose(fr, c, &opts[i]);
                        continue;
                    }
                    // "The nearest one", "첫 번째": the list already on screen, by its place.
                    let on_screen = !said.is_empty() && opts.first().is_some_and(|o| s.conv.offered.first() == Some(&o.id)) && opts.iter().all(|o| s.conv.offered.contains(&o.id));
                    if let Some(n) = on_screen.then(|| value::ordinal(&without_enums(flow, said))).flatten().filter(|n| *n <= opts.len()) {
                        choose(fr, c, &opts[n - 1]);
                        continue;
                    }
                    if def.auto_single && opts.len() == 1 {
                        self.show(s, lang, flow, fr, &from, tx).await;
                        choose(fr, c, &opts[0]);
                        continue;
                    }
                    self.show(s, lang, flow, fr, &from, tx).await;
                    let q = def.ask.as_ref().map(|a| a.get(lang.code()).to_owned()).unwrap_or_else(|| say(lang, Say::WhichOne));
                    fr.asking = Some(c.clone());
                    self.tell(s, tx, q).await;
                    return Ok(Outcome::Asked);
                }
                if fr.slots.contains_key(c) {
                    continue;
                }
                if let Some(d) = &def.default {
                    fr.slots.insert(c.clone(), d.clone());
                    continue;
                }
                if !def.required {
                    continue;
                }
                let q = def.ask.as_ref().map(|a| a.get(lang.code()).to_owned()).unwrap_or_else(|| c.replace('_', " "));
                fr.asking = Some(c.clone());
                self.tell(s, tx, q).await;
                return Ok(Outcome::Asked);
            }
            let args = args_of(step, fr);
            if let Some(t) = &step.call {
                let name = step_name(step);
                if fr.results.get(&name).is_some_and(|(a, _)| a == &args) {
                    continue;
                }
                let Some(tool) = self.announce(sid, t, &args, tx).await? else { return Ok(Outcome::Stopped) };
                let endpoint = tool.def.endpoint.clone().ok_or_else(|| format!("`{t}` has no endpoint"))?;
                let mut r = self.adapter.call(CallRequest { tool: &tool, endpoint: &endpoint, args: &args, idempotency_key: None, check_result: true, confirmed: None }).await;
                // Found nothing: drop the optional slots the step may relax, one by one.
                let list = flow.def.slots.iter().find(|d| d.from.as_deref() == Some(name.as_str())).map(|d| d.list_pointer().to_owned()).unwrap_or_else(|| "/items".into());
                let empty = |v: &Value| v.pointer(&list).and_then(Value::as_array).is_some_and(|a| a.is_empty());
                let mut args = args;
                for drop in &step.relax {
                    if !r.as_ref().is_ok_and(empty) || !fr.slots.contains_key(drop) {
                        continue;
                    }
                    self.audit_row(sid, "system", "relax", Some(t), json!({"dropped": drop, "value": fr.slots.get(drop)}), "nothing found")?;
                    fr.slots.remove(drop);
                    args = args_of(step, fr);
                    emit(tx, AgentEvent::ToolCall { tool: t.clone(), arguments: Value::Object(args.clone()) }).await;
                    r = self.adapter.call(CallRequest { tool: &tool, endpoint: &endpoint, args: &args, idempotency_key: None, check_result: true, confirmed: None }).await;
                }
                match r {
                    Ok(v) => {
                        self.audit_row(sid, "system", "tool_call", Some(t), json!({"arguments": args, "flow": fr.flow}), "ok")?;
                        s.conv.evidence.add_result(&tool.app, t, &v);
                        emit(tx, AgentEvent::ToolResult { tool: t.clone(), ok: true, detail: String::new() }).await;
                        fr.results.insert(name.clone(), (args, v));
                        if step.show || step.end {
                            self.show(s, lang, flow, fr, &name, tx).await;
                        }
                        if step.end {
                            return Ok(Outcome::Finished);
                        }
                    }
                    Err(e) => {
                        self.audit_row(sid, "system", "tool_call", Some(t), json!({"arguments": args, "error": e.model}), &format!("{:?}", e.kind))?;
                        emit(tx, AgentEvent::ToolResult { tool: t.clone(), ok: false, detail: e.model.clone() }).await;
                        self.tell(s, tx, e.user.clone()).await;
                        for sl in step_slots(step) {
                            if fresh.contains(&sl) {
                                clear(flow, fr, &sl);
                            }
                        }
                        return Ok(Outcome::Stopped);
                    }
                }
                continue;
            }
            if let Some(t) = &step.quote {
                let Some(tool) = self.announce(sid, t, &args, tx).await? else { return Ok(Outcome::Stopped) };
                self.quote(sid, s, lang, &tool, args, true, tx).await?;
                if s.gate.pending.is_some() {
                    fr.quoted = true;
                    return Ok(Outcome::Waiting);
                }
                // Refused (closed, sold out, busy, an unknown code). The refusal
                // names what it is about first ("Harbor Burger Co. (se07) is
                // closed", "… is not free at 17:30 on 2026-12-10"): that slot is
                // emptied and the rest kept, so the person chooses again. When it
                // names none of them, what was just said is emptied.
                let refusal = s.conv.dialogue.recent.last().filter(|(r, _)| r == "assistant").map(|(_, t)| t.to_lowercase()).unwrap_or_default();
                let first = step_slots(step)
                    .into_iter()
                    .filter_map(|sl| {
                        let v = fr.slots.get(&sl).and_then(Value::as_str)?.to_lowercase();
                        (v.chars().count() >= 3).then(|| refusal.find(&v)).flatten().map(|i| (i, sl))
                    })
                    .min();
                match first {
                    Some((_, sl)) => clear(flow, fr, &sl),
                    None => {
                        for sl in step_slots(step) {
                            if fresh.contains(&sl) {
                                clear(flow, fr, &sl);
                            }
                        }
                    }
                }
                return Ok(Outcome::Stopped);
            }
        }
        Ok(Outcome::Finished)
    }

    /// Shows the card of a step's result once.
    async fn show(&self, s: &mut Session, lang: Lang, flow: &Flow, fr: &mut Frame, step: &str, tx: &Tx) {
        let Some((args, result)) = fr.results.get(step) else { return };
        let key = format!("{step} {}", Value::Object(args.clone()));
        if fr.shown.contains(&key) {
            return;
        }
        let Some(st) = flow.def.steps.iter().find(|st| st.call.is_some() && step_name(st) == step) else { return };
        let tool_name = st.call.clone().unwrap_or_default();
        let Some(tool) = self.tools().get(&tool_name).cloned() else { return };
        let Some(kind) = &tool.def.card else { return };
        let card = present::card(kind, &tool_name, &tool.app, result, lang);
        if !card.options.is_empty() {
            s.conv.offered = card.options.iter().map(|o| o.id.clone()).collect();
            s.conv.offered_replies = card.options.iter().map(|o| (o.reply.clone(), o.id.clone())).collect();
        }
        fr.shown.push(key);
        emit(tx, AgentEvent::Card(card)).await;
    }

    /// The assistant's own words, to the person and to the command prompt.
    pub(super) async fn tell(&self, s: &mut Session, tx: &Tx, text: String) {
        s.conv.dialogue.note("assistant", &text);
        emit(tx, AgentEvent::Notice { text }).await;
    }

    /// A confirmation still open is void (the task was cancelled or changed).
    pub(super) fn drop_pending(&self, sid: &str, s: &mut Session, why: &str) -> Result<(), String> {
        if let Some(p) = s.gate.pending.take() {
            self.audit_row(sid, "user", "superseded", Some(&p.tool.def.name), json!({"summary": p.req.summary, "amount": p.req.amount}), why)?;
        }
        if let Some(fr) = s.conv.dialogue.stack.last_mut() {
            fr.quoted = false;
        }
        Ok(())
    }

    fn count(&self, s: &mut Session, g: &crate::dialogue::generate::Generated) {
        s.turn.stats.add_round(g.prompt_tokens, g.cached_tokens, g.completion_tokens, g.prefill_ms, g.decode_ms);
    }

    /// Shows the call about to be made and checks its arguments against the
    /// tool's schema; `None` when they do not fit (told in the audit log).
    async fn announce(&self, sid: &str, t: &str, args: &Map<String, Value>, tx: &Tx) -> Result<Option<std::sync::Arc<crate::tools::Tool>>, String> {
        let Some(tool) = self.tools().get(t).cloned() else { return Err(format!("tool {t} vanished")) };
        emit(tx, AgentEvent::ToolCall { tool: t.to_owned(), arguments: Value::Object(args.clone()) }).await;
        if let Err(e) = tool.validate(args) {
            self.audit_row(sid, "system", "tool_call", Some(t), json!({"arguments": args}), &format!("rejected: {e}"))?;
            emit(tx, AgentEvent::ToolResult { tool: t.to_owned(), ok: false, detail: e }).await;
            return Ok(None);
        }
        Ok(Some(tool))
    }

    /// Small talk and questions: the model answers in a few words, with a
    /// prompt of its own.
    async fn chat_reply(&self, sid: &str, s: &mut Session, lang: Lang, text: &str, tx: &Tx) -> Result<(), String> {
        let language = match lang {
            Lang::En => "English",
            Lang::Zh => "Chinese",
            Lang::Ko => "Korean",
        };
        let mut system = format!(
            "You are Errand, a friendly life assistant in a payment app. Reply in {language}, in one or two short sentences. \
             You can order food and groceries, call rides, book trains, shows and salons, and unlock bikes. \
             You never pay without the user's confirmation, and you cannot send money to people or pay strangers' codes. \
             Today is {}.",
            crate::world::calendar::date_text(self.opts.clock.now_s().div_euclid(86_400))
        );
        if let Some(fr) = s.conv.dialogue.top() {
            if let Some((_, r)) = fr.results.values().last() {
                let mut ctx = present::compact(r).to_string();
                ctx = ctx.chars().take(600).collect();
                system.push_str(&format!("\nWhat the user is looking at: {ctx}"));
            }
        }
        let mut messages = vec![Message::system(system)];
        for (role, t) in s.conv.dialogue.recent.iter().rev().skip(1).take(2).rev() {
            messages.push(if role == "user" { Message::user(t.clone()) } else { Message::assistant(t.clone()) });
        }
        messages.push(Message::user(text.to_owned()));
        let (ttx, mut trx) = tokio::sync::mpsc::channel::<String>(64);
        let req = GenRequest { session: Some(format!("{sid}#chat")), messages, grammar: None, max_tokens: 80, sampling: self.opts.sampling, lang: lang.code().into() };
        let started = s.turn.started;
        let fwd = async {
            let mut first = None;
            let mut all = String::new();
            while let Some(t) = trx.recv().await {
                if first.is_none() {
                    first = Some(started.elapsed().as_secs_f64() * 1000.0);
                }
                all.push_str(&t);
                emit(tx, AgentEvent::Token { text: t }).await;
            }
            (first, all)
        };
        let (g, (first, all)) = tokio::join!(self.generator.generate(req, Some(ttx)), fwd);
        let g = g?;
        self.count(s, &g);
        if s.turn.stats.first_token_ms.is_none() {
            s.turn.stats.first_token_ms = first;
        }
        self.audit_row(sid, "model", "chat", None, json!({"chars": all.chars().count()}), "answered")?;
        s.conv.dialogue.note("assistant", all.trim());
        Ok(())
    }
}
