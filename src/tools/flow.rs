//! Flows: the business logic a mini-program declares in its manifest.
//!
//! A flow is what one task takes ("order food", "book a ride"): typed slots
//! with a question each, and steps that collect them, call the app's tools,
//! quote and hand the payment to the confirmation gate. The dialogue manager
//! (`crate::dialogue`) runs flows deterministically; the language model only
//! turns each message into commands ("start order_food", "set address …").
//! The format is documented in `tools/README.md`; everything here is checked
//! when the manifest loads, so a flow that loads can run.

use super::{Localized, ToolDef};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What a slot holds, and so how its value is read and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotKind {
    /// A place or city as the person named it ("People's Square", 人民广场).
    Place,
    /// A day, `YYYY-MM-DD`, from the person's words ("tomorrow", 周六).
    Date,
    /// A time of day, `HH:MM` ("7pm", 晚上7点, 오후 7시).
    Time,
    /// A whole number ("three", 两, 두).
    Count,
    /// One of `values` (synonyms per value may be listed).
    Enum,
    /// An option from a step's results (`from`), picked by number, name or tap.
    Choice,
    /// Free text in the person's own words (an address, a dish).
    Text,
}

/// One slot of a flow.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotDef {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: SlotKind,
    /// What this slot is, for the model ("the delivery address").
    #[serde(default)]
    pub description: Option<String>,
    /// A required slot is asked for when missing; an optional one is left
    /// out of the calls that use it.
    #[serde(default = "yes")]
    pub required: bool,
    /// The question, per language (required for required slots without a default).
    #[serde(default)]
    pub ask: Option<Localized>,
    /// Used when the person says nothing about the slot.
    #[serde(default)]
    pub default: Option<Value>,
    /// `enum`: the allowed values.
    #[serde(default)]
    pub values: Vec<String>,
    /// `enum`: words that mean a value, in any language (`{"economy": ["cheapest", "经济"]}`).
    #[serde(default)]
    pub synonyms: std::collections::BTreeMap<String, Vec<String>>,
    /// `count`: bounds (default 1 to 20).
    #[serde(default)]
    pub min: Option<i64>,
    #[serde(default)]
    pub max: Option<i64>,
    /// `choice`: the call step (`as`) whose result holds the options, or
    /// `@orders`: the orders confirmed in this conversation with this app.
    #[serde(default)]
    pub from: Option<String>,
    /// `choice`: JSON pointer to the options' array in that result (default `/items`).
    #[serde(default)]
    pub list: Option<String>,
    /// `choice`: the option field that is the slot's value (default `id`).
    #[serde(default)]
    pub value: Option<String>,
    /// `choice`: the option field that names it (default `name`; a string
    /// or an object of languages).
    #[serde(default)]
    pub label: Option<String>,
    /// `choice`: a `text` slot whose words pick the option by its name (the
    /// dish the person asked for picks the menu item).
    #[serde(default)]
    pub hint: Option<String>,
    /// `choice`: with a single option, take it without asking (its card is
    /// still shown).
    #[serde(default)]
    pub auto_single: bool,
    /// `text`: a regular expression the value must match (an address has
    /// a number in it: `[0-9]`).
    #[serde(default)]
    pub pattern: Option<String>,
    /// `place`: `origin` or `destination`; code then reads the place from
    /// the words around it ("from X", "X에서", "从X"; "to Y", "Y까지", "去Y").
    #[serde(default)]
    pub role: Option<String>,
    /// `place`: `city` when the slot wants a city, not a spot in it ("上海超市的鸡蛋":
    /// 上海; a landmark named stands for its city).
    #[serde(default)]
    pub scope: Option<String>,
    /// `text`: a street address; code reads it from the words after a cue
    /// ("deliver to", "送到", "주소는") and widens a part the model copied.
    #[serde(default)]
    pub address: bool,
}

/// A choice slot's `from` that picks among the orders confirmed in this
/// conversation with the flow's app (to cancel a ride, lock a bike).
pub const ORDERS: &str = "@orders";

fn yes() -> bool {
    true
}

impl SlotDef {
    pub fn list_pointer(&self) -> &str {
        self.list.as_deref().unwrap_or("/items")
    }
    pub fn value_field(&self) -> &str {
        self.value.as_deref().unwrap_or("id")
    }
    pub fn label_field(&self) -> &str {
        self.label.as_deref().unwrap_or("name")
    }
    pub fn bounds(&self) -> (i64, i64) {
        (self.min.unwrap_or(1), self.max.unwrap_or(20))
    }
}

/// When a step runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    /// Runs only when these slots are filled.
    #[serde(default)]
    pub filled: Vec<String>,
    /// Runs only when these slots are empty.
    #[serde(default)]
    pub missing: Vec<String>,
    /// Runs only when the slot holds one of the values: `{"slot": ["a", "b"]}`.
    #[serde(default)]
    pub is: std::collections::BTreeMap<String, Vec<String>>,
}

/// One step. Exactly one of `collect`, `call` and `quote`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Ask for the slot when it is missing (choices show their options).
    #[serde(default)]
    pub collect: Option<String>,
    /// Call a tool that moves no money; its result is kept under `as`.
    #[serde(default)]
    pub call: Option<String>,
    /// Quote a tool marked `confirm` and hand it to the confirmation gate:
    /// the flow waits for the person's Confirm, then pays.
    #[serde(default)]
    pub quote: Option<String>,
    #[serde(default, rename = "as")]
    pub name: Option<String>,
    /// The tool's arguments: literals, `"$slot"`, or `"$slot.field"` (a
    /// field of the option a choice slot holds). An argument whose slot is
    /// empty is left out.
    #[serde(default)]
    pub args: Map<String, Value>,
    #[serde(default)]
    pub when: Option<When>,
    /// Show the call's card even when a choice is made without asking.
    #[serde(default)]
    pub show: bool,
    /// The flow is done after this call (an answer, not a purchase).
    #[serde(default)]
    pub end: bool,
    /// When the call finds nothing, these optional slots are dropped one
    /// by one and the call is tried again ("vegetarian" as a dish finds
    /// nothing; as a cuisine alone it does).
    #[serde(default)]
    pub relax: Vec<String>,
}

/// A flow as declared.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowDef {
    pub id: String,
    /// What the flow does, for the person and for the model.
    pub description: Localized,
    /// Requests that start it, in any language: the candidate retrieval
    /// and the model's examples read them.
    #[serde(default)]
    pub examples: Vec<String>,
    /// Words, in any language, that point at this flow rather than at the
    /// app's others ("refund", 退票, 환불). Among an app's flows, those whose
    /// words a message has are its candidates; when none has them, all are.
    #[serde(default)]
    pub keywords: Vec<String>,
    pub slots: Vec<SlotDef>,
    pub steps: Vec<Step>,
}

/// A flow with the app it belongs to.
#[derive(Debug, Clone)]
pub struct Flow {
    pub app: String,
    pub def: FlowDef,
}

impl Flow {
    pub fn slot(&self, name: &str) -> Option<&SlotDef> {
        self.def.slots.iter().find(|s| s.name == name)
    }
}

/// The slot names an argument template refers to, with the field if any.
pub fn refs(v: &Value, out: &mut Vec<(String, Option<String>)>) {
    match v {
        Value::String(s) => {
            if let Some(r) = s.strip_prefix('$') {
                let (slot, field) = match r.split_once('.') {
                    Some((a, b)) => (a.to_owned(), Some(b.to_owned())),
                    None => (r.to_owned(), None),
                };
                out.push((slot, field));
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        Value::Object(o) => o.values().for_each(|x| refs(x, out)),
        _ => {}
    }
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 40 && s.chars().next().is_some_and(|c| c.is_ascii_lowercase()) && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Checks a flow against its app's tools. The error names the flow and
/// what to fix.
pub fn validate(app: &str, f: &FlowDef, tools: &[ToolDef]) -> Result<(), String> {
    let at = |m: String| format!("flow `{}`: {m}", f.id);
    if !valid_id(&f.id) {
        return Err(format!("flow id `{}` must be 1-40 characters of a-z, 0-9 and _, starting with a letter", f.id));
    }
    if f.steps.is_empty() {
        return Err(at("has no steps".into()));
    }
    if let Some(k) = f.keywords.iter().find(|k| k.trim().is_empty() || k.chars().count() > 40) {
        return Err(at(format!("keyword `{k}` is blank or over 40 characters")));
    }
    let mut names: Vec<&str> = Vec::new();
    for s in &f.slots {
        if !valid_id(&s.name) {
            return Err(at(format!("slot name `{}` must be a-z, 0-9 and _, starting with a letter", s.name)));
        }
        if names.contains(&s.name.as_str()) {
            return Err(at(format!("slot `{}` is declared twice", s.name)));
        }
        names.push(&s.name);
        let needs_question = s.required && s.default.is_none();
        if needs_question && s.ask.as_ref().is_none_or(|a| a.en.trim().is_empty()) {
            return Err(at(format!("required slot `{}` needs an `ask` question (at least `en`)", s.name)));
        }
        match s.kind {
            SlotKind::Enum => {
                if s.values.is_empty() {
                    return Err(at(format!("enum slot `{}` lists no `values`", s.name)));
                }
                for (k, _) in &s.synonyms {
                    if !s.values.contains(k) {
                        return Err(at(format!("slot `{}`: synonyms for `{k}`, which is not one of its values", s.name)));
                    }
                }
                if let Some(d) = &s.default {
                    if !d.as_str().is_some_and(|d| s.values.iter().any(|v| v == d)) {
                        return Err(at(format!("slot `{}`: default {d} is not one of its values", s.name)));
                    }
                }
            }
            SlotKind::Choice => {
                let Some(from) = &s.from else {
                    return Err(at(format!("choice slot `{}` needs `from`: the call step whose results it picks from", s.name)));
                };
                if from != ORDERS && !f.steps.iter().any(|st| st.call.is_some() && st.name.as_deref() == Some(from)) {
                    return Err(at(format!("choice slot `{}` picks from `{from}`, but no call step is named `{from}` (`\"as\": \"{from}\"`)", s.name)));
                }
                if !s.list_pointer().starts_with('/') {
                    return Err(at(format!("slot `{}`: `list` must be a JSON pointer such as `/items`", s.name)));
                }
            }
            SlotKind::Count => {
                let (lo, hi) = s.bounds();
                if lo > hi {
                    return Err(at(format!("count slot `{}`: min {lo} is above max {hi}", s.name)));
                }
            }
            _ => {}
        }
        if let Some(p) = &s.pattern {
            if s.kind != SlotKind::Text {
                return Err(at(format!("slot `{}`: `pattern` belongs to text slots", s.name)));
            }
            regex::Regex::new(p).map_err(|e| at(format!("slot `{}`: `pattern` is not a valid regular expression: {e}", s.name)))?;
        }
        if let Some(r) = &s.role {
            if s.kind != SlotKind::Place || !matches!(r.as_str(), "origin" | "destination") {
                return Err(at(format!("slot `{}`: `role` is `origin` or `destination`, on place slots", s.name)));
            }
        }
        if let Some(sc) = &s.scope {
            if s.kind != SlotKind::Place || sc != "city" {
                return Err(at(format!("slot `{}`: `scope` is `city`, on place slots", s.name)));
            }
        }
        if s.address && s.kind != SlotKind::Text {
            return Err(at(format!("slot `{}`: `address` belongs to text slots", s.name)));
        }
        if s.kind != SlotKind::Enum && !s.values.is_empty() {
            return Err(at(format!("slot `{}` has `values` but is not an enum", s.name)));
        }
        if s.kind != SlotKind::Choice && (s.from.is_some() || s.hint.is_some() || s.auto_single) {
            return Err(at(format!("slot `{}`: `from`, `hint` and `auto_single` belong to choice slots", s.name)));
        }
    }
    for s in &f.slots {
        if let Some(h) = &s.hint {
            if !f.slots.iter().any(|x| &x.name == h && matches!(x.kind, SlotKind::Text | SlotKind::Enum)) {
                return Err(at(format!("slot `{}`: hint `{h}` must name a text or enum slot of this flow", s.name)));
            }
        }
    }
    // Steps, in order: what a step uses must be collected (or optional) before it.
    let mut collected: Vec<&str> = Vec::new();
    let mut called: Vec<&str> = Vec::new();
    let mut quotes = 0;
    for (i, st) in f.steps.iter().enumerate() {
        let n = i + 1;
        let kinds = [st.collect.is_some(), st.call.is_some(), st.quote.is_some()].iter().filter(|b| **b).count();
        if kinds != 1 {
            return Err(at(format!("step {n} must have exactly one of `collect`, `call` and `quote`")));
        }
        if let Some(w) = &st.when {
            for slot in w.filled.iter().chain(&w.missing).chain(w.is.keys()) {
                if !names.contains(&slot.as_str()) {
                    return Err(at(format!("step {n}: `when` names `{slot}`, which is not a slot")));
                }
            }
        }
        if let Some(c) = &st.collect {
            let Some(slot) = f.slots.iter().find(|s| &s.name == c) else {
                return Err(at(format!("step {n} collects `{c}`, which is not a slot")));
            };
            if let Some(from) = &slot.from {
                if from != ORDERS && !called.contains(&from.as_str()) {
                    return Err(at(format!("step {n} collects `{c}` before the call `{from}` its options come from")));
                }
            }
            collected.push(c);
            continue;
        }
        let (tool_name, is_quote) = match (&st.call, &st.quote) {
            (Some(t), _) => (t, false),
            (_, Some(t)) => (t, true),
            _ => unreachable!("checked above"),
        };
        let Some(tool) = tools.iter().find(|t| &t.name == tool_name) else {
            return Err(at(format!("step {n} uses `{tool_name}`, which is not a tool of app `{app}`")));
        };
        if is_quote && !tool.confirm {
            return Err(at(format!("step {n} quotes `{tool_name}`, which is not marked `confirm`; use `call`")));
        }
        if !is_quote && tool.confirm {
            return Err(at(format!("step {n} calls `{tool_name}`, which moves money or commits (`confirm: true`); use `quote`, so the person confirms first")));
        }
        for r in &st.relax {
            if !f.slots.iter().any(|x| &x.name == r && !x.required) {
                return Err(at(format!("step {n}: `relax` names `{r}`, which is not an optional slot")));
            }
        }
        // The flow stops at the first quote it reaches, so quotes under a
        // `when` (other ways to the same purchase) may come before the last.
        if is_quote {
            quotes += usize::from(st.when.is_none());
            if st.end || st.show {
                return Err(at(format!("step {n}: `end` and `show` belong to call steps")));
            }
        }
        if let Some(nm) = &st.name {
            if !valid_id(nm) || called.contains(&nm.as_str()) {
                return Err(at(format!("step {n}: `as` must be a new name of a-z, 0-9 and _")));
            }
            called.push(nm);
        }
        let props = tool.parameters["properties"].as_object();
        for k in st.args.keys() {
            if !props.is_some_and(|p| p.contains_key(k)) {
                return Err(at(format!("step {n}: `{tool_name}` has no parameter `{k}`")));
            }
        }
        let mut r = Vec::new();
        refs(&Value::Object(st.args.clone()), &mut r);
        for (slot, field) in r {
            let Some(def) = f.slots.iter().find(|s| s.name == slot) else {
                return Err(at(format!("step {n}: `${slot}` is not a slot")));
            };
            if field.is_some() && def.kind != SlotKind::Choice {
                return Err(at(format!("step {n}: `${slot}.…` reads a field of an option, but `{slot}` is not a choice slot")));
            }
            // A call may use a slot collected later (a search narrowed by the
            // service once known; until then the argument is left out); the
            // quote must have every required value.
            if is_quote && def.required && def.default.is_none() && !collected.contains(&slot.as_str()) {
                return Err(at(format!("step {n} quotes with `${slot}` before a step collects it")));
            }
        }
    }
    if quotes > 1 {
        return Err(at("has more than one quote step without `when`; a flow ends in at most one payment, so the others must be conditional".into()));
    }
    for s in &f.slots {
        if s.required && s.default.is_none() && !collected.contains(&s.name.as_str()) {
            return Err(at(format!("required slot `{}` is never collected", s.name)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::tools::parse_manifest;
    use serde_json::{json, Value};
    use std::path::Path;

    /// A manifest with one search tool, one confirmed tool and `flows`.
    fn manifest(flows: Value) -> String {
        json!({
            "app": "shop",
            "title": {"en": "Shop"},
            "base_url": "http://127.0.0.1:1",
            "tools": [
                {"name": "shop_search", "description": {"en": "Find items"}, "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}, "confirm": false, "endpoint": {"method": "GET", "path": "/items"}},
                {"name": "shop_buy", "description": {"en": "Buy an item"}, "parameters": {"type": "object", "properties": {"item_id": {"type": "string"}, "n": {"type": "integer"}}, "required": ["item_id"]}, "confirm": true, "endpoint": {"method": "POST", "path": "/orders"}, "quote": {"method": "POST", "path": "/orders/quote"}}
            ],
            "flows": flows
        })
        .to_string()
    }

    fn good() -> Value {
        json!([{
            "id": "buy",
            "description": {"en": "buy an item"},
            "slots": [
                {"name": "what", "type": "text", "ask": {"en": "What would you like?"}},
                {"name": "item", "type": "choice", "from": "found", "hint": "what", "ask": {"en": "Which one?"}},
                {"name": "n", "type": "count", "default": 1}
            ],
            "steps": [
                {"collect": "what"},
                {"call": "shop_search", "as": "found", "args": {"q": "$what"}},
                {"collect": "item"},
                {"quote": "shop_buy", "args": {"item_id": "$item", "n": "$n"}}
            ]
        }])
    }

    fn error(edit: impl FnOnce(&mut Value)) -> String {
        let mut f = good();
        edit(&mut f);
        match parse_manifest(&manifest(f), Path::new("shop.json")) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_valid_flow_loads_and_its_app_has_flows() {
        let tools = parse_manifest(&manifest(good()), Path::new("shop.json")).unwrap();
        let set = crate::tools::ToolSet::from_tools(tools);
        assert!(set.has_flows("shop"));
        assert_eq!(set.flow("buy").map(|f| f.app.as_str()), Some("shop"));
    }

    #[test]
    fn broken_flows_are_refused_with_the_flow_and_the_reason() {
        let cases: Vec<(Box<dyn FnOnce(&mut Value)>, &str)> = vec![
            (Box::new(|f| f[0]["keywords"] = json!(["refund", " "])), "keyword ` ` is blank"),
            (Box::new(|f| f[0]["steps"][3] = json!({"call": "shop_buy", "args": {"item_id": "$item"}})), "use `quote`"),
            (Box::new(|f| f[0]["steps"][3] = json!({"quote": "shop_search", "args": {"q": "$what"}})), "not marked `confirm`"),
            (Box::new(|f| f[0]["steps"][3]["args"] = json!({"item_id": "$nothing"})), "`$nothing` is not a slot"),
            (Box::new(|f| f[0]["steps"][3]["args"] = json!({"colour": "red", "item_id": "$item"})), "has no parameter `colour`"),
            (Box::new(|f| f[0]["slots"][0]["ask"] = Value::Null), "needs an `ask`"),
            (Box::new(|f| f[0]["slots"][1]["from"] = json!("nowhere")), "no call step is named `nowhere`"),
            (Box::new(|f| { f[0]["steps"].as_array_mut().unwrap().remove(2); }), "quotes with `$item` before a step collects it"),
            (Box::new(|f| { f[0]["slots"].as_array_mut().unwrap().push(json!({"name": "note", "type": "text", "ask": {"en": "Any note?"}})); }), "required slot `note` is never collected"),
            (Box::new(|f| f[0]["steps"][0] = json!({"collect": "what", "call": "shop_search"})), "exactly one of"),
            (Box::new(|f| f[0]["slots"][0]["pattern"] = json!("[0-9")), "not a valid regular expression"),
            (Box::new(|f| f[0]["id"] = json!("Buy Now")), "flow id"),
            (Box::new(|f| f[0]["steps"][2] = json!({"call": "teleport"})), "not a tool of app `shop`"),
            (Box::new(|f| { let c = f[0].clone(); f.as_array_mut().unwrap().push(c); }), "declared twice"),
        ];
        for (edit, want) in cases {
            let e = error(|f| {
                edit(f);
            });
            assert!(e.contains("shop.json") && e.contains(want), "wanted {want:?} in: {e}");
        }
    }
}
