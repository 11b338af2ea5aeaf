//! Value matchers for tool arguments, confirmation amounts and state
//! predicates. A plain YAML value matches exactly; a one-key map picks
//! another kind (`norm`, `contains`, `any_of`, `regex`, `range`, `absent`,
//! `present`, `not`), and `optional: true` beside it lets the value be absent.

use anyhow::{bail, Context, Result};
use serde_json::Value;

#[derive(Debug, Clone)]
pub enum Matcher {
    /// Equal as JSON; numbers compare by value (2 == 2.0).
    Exact(Value),
    /// Equal after [`normalize`] (case, spaces, punctuation).
    Norm(String),
    /// The normalised text contains this (normalised); a list: one element does.
    Contains(String),
    AnyOf(Vec<Matcher>),
    Regex(regex::Regex),
    /// A number (or a text that is one) within the bounds, inclusive.
    Range { min: Option<f64>, max: Option<f64> },
    /// The key is not there (or is null).
    Absent,
    /// The key is there with any non-null value.
    Present,
    Not(Box<Matcher>),
    /// Absence is fine; a present value must match the inner matcher.
    Optional(Box<Matcher>),
}

/// Lower case, with whitespace and punctuation (ASCII and CJK) removed,
/// so "Kung Pao  chicken!" and "kung-pao chicken" compare equal.
pub fn normalize(s: &str) -> String {
    s.chars()
        .filter(|c| !(c.is_whitespace() || c.is_ascii_punctuation() || is_wide_punct(*c)))
        .flat_map(char::to_lowercase)
        .collect()
}

fn is_wide_punct(c: char) -> bool {
    matches!(c, '\u{3000}'..='\u{303F}' | '\u{FF01}'..='\u{FF0F}' | '\u{FF1A}'..='\u{FF20}' | '\u{FF3B}'..='\u{FF40}' | '\u{FF5B}'..='\u{FF65}' | '\u{2010}'..='\u{2027}' | '·')
}

fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b)),
        (Value::Object(x), Value::Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w))),
        _ => a == b,
    }
}

impl Matcher {
    pub fn compile(v: &Value) -> Result<Matcher> {
        let Value::Object(m) = v else { return Ok(Matcher::Exact(v.clone())) };
        let optional = match m.get("optional") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(o) => bail!("`optional` must be true or false; got {o}"),
        };
        let keys: Vec<&String> = m.keys().filter(|k| *k != "optional").collect();
        let inner = match keys.as_slice() {
            [k] => Self::compile_kind(k, &m[k.as_str()])?,
            // {min: 1, max: 5} reads as a range.
            _ if !keys.is_empty() && keys.iter().all(|k| *k == "min" || *k == "max") => Matcher::Range {
                min: m.get("min").map(|x| as_number(x).context("min must be a number")).transpose()?,
                max: m.get("max").map(|x| as_number(x).context("max must be a number")).transpose()?,
            },
            [] if optional => Matcher::Present,
            _ => bail!(
                "a matcher is a plain value or a map with one of exact, norm, contains, any_of, regex, range (or min/max), absent, present, not; got keys {}",
                keys.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
            ),
        };
        Ok(if optional { inner.optional() } else { inner })
    }

    fn compile_kind(k: &str, v: &Value) -> Result<Matcher> {
        let text = |what: &str| v.as_str().map(String::from).with_context(|| format!("`{what}` takes a text; got {v}"));
        Ok(match k {
            "exact" => Matcher::Exact(v.clone()),
            "norm" => Matcher::Norm(normalize(&text("norm")?)),
            "contains" => {
                let t = normalize(&text("contains")?);
                if t.is_empty() {
                    bail!("`contains` needs letters or digits");
                }
                Matcher::Contains(t)
            }
            "any_of" => match v {
                Value::Array(a) if !a.is_empty() => Matcher::AnyOf(a.iter().map(Matcher::compile).collect::<Result<_>>()?),
                _ => bail!("`any_of` takes a non-empty list"),
            },
            "regex" => Matcher::Regex(regex::Regex::new(&text("regex")?).map_err(|e| anyhow::anyhow!("bad regex: {e}"))?),
            "range" => match v {
                Value::Array(a) if a.len() == 2 => {
                    let b = |x: &Value| -> Result<Option<f64>> {
                        if x.is_null() {
                            Ok(None)
                        } else {
                            as_number(x).map(Some).with_context(|| format!("range bounds are numbers or null; got {x}"))
                        }
                    };
                    let (min, max) = (b(&a[0])?, b(&a[1])?);
                    if let (Some(lo), Some(hi)) = (min, max) {
                        if lo > hi {
                            bail!("range [{lo}, {hi}] is empty");
                        }
                    }
                    Matcher::Range { min, max }
                }
                _ => bail!("`range` takes [min, max] (either may be null)"),
            },
            "absent" => match v {
                Value::Bool(true) => Matcher::Absent,
                _ => bail!("write `absent: true`"),
            },
            "present" => match v {
                Value::Bool(true) => Matcher::Present,
                _ => bail!("write `present: true`"),
            },
            "not" => Matcher::Not(Box::new(Matcher::compile(v)?)),
            "min" | "max" => Matcher::Range {
                min: if k == "min" { Some(as_number(v).context("min must be a number")?) } else { None },
                max: if k == "max" { Some(as_number(v).context("max must be a number")?) } else { None },
            },
            other => bail!("unknown matcher `{other}`; use exact, norm, contains, any_of, regex, range, absent, present or not"),
        })
    }

    pub fn optional(self) -> Matcher {
        match self {
            m @ (Matcher::Optional(_) | Matcher::Absent) => m,
            m => Matcher::Optional(Box::new(m)),
        }
    }

    /// Whether a missing value satisfies this matcher.
    pub fn allows_absent(&self) -> bool {
        match self {
            Matcher::Absent | Matcher::Optional(_) => true,
            Matcher::Not(m) => !m.allows_absent(),
            Matcher::AnyOf(ms) => ms.iter().any(Matcher::allows_absent),
            _ => false,
        }
    }

    /// Matches a value that may be missing (`None`, or JSON null).
    pub fn matches_opt(&self, v: Option<&Value>) -> bool {
        match v {
            None | Some(Value::Null) => self.allows_absent(),
            Some(v) => self.matches(v),
        }
    }

    /// Matches a present value. A list matches a scalar expectation when
    /// one of its elements does.
    pub fn matches(&self, v: &Value) -> bool {
        if v.is_null() {
            return self.allows_absent();
        }
        match self {
            Matcher::Exact(want) => json_eq(want, v) || (!want.is_array() && v.as_array().is_some_and(|a| a.iter().any(|x| json_eq(want, x)))),
            Matcher::Norm(want) => self.each(v, |x| normalize(&text_of(x)) == *want),
            Matcher::Contains(want) => self.each(v, |x| normalize(&text_of(x)).contains(want.as_str())),
            Matcher::AnyOf(ms) => ms.iter().any(|m| m.matches(v)),
            Matcher::Regex(r) => self.each(v, |x| r.is_match(&text_of(x))),
            Matcher::Range { min, max } => self.each(v, |x| as_number(x).is_some_and(|n| min.is_none_or(|lo| n >= lo) && max.is_none_or(|hi| n <= hi))),
            Matcher::Absent => false,
            Matcher::Present => true,
            Matcher::Not(m) => !m.matches(v),
            Matcher::Optional(m) => m.matches(v),
        }
    }

    fn each(&self, v: &Value, f: impl Fn(&Value) -> bool) -> bool {
        match v {
            Value::Array(a) => a.iter().any(&f),
            other => f(other),
        }
    }

    /// A short description for failure messages.
    pub fn describe(&self) -> String {
        match self {
            Matcher::Exact(v) => v.to_string(),
            Matcher::Norm(s) => format!("≈\"{s}\""),
            Matcher::Contains(s) => format!("contains \"{s}\""),
            Matcher::AnyOf(ms) => format!("any of [{}]", ms.iter().map(Matcher::describe).collect::<Vec<_>>().join(", ")),
            Matcher::Regex(r) => format!("/{}/", r.as_str()),
            Matcher::Range { min, max } => format!("in [{}, {}]", min.map_or("-∞".into(), |x| x.to_string()), max.map_or("∞".into(), |x| x.to_string())),
            Matcher::Absent => "absent".into(),
            Matcher::Present => "present".into(),
            Matcher::Not(m) => format!("not {}", m.describe()),
            Matcher::Optional(m) => format!("{} or absent", m.describe()),
        }
    }
}

/// The value at a dotted path (`restaurant.tags`, `data.items.name`). A
/// list met on the way is mapped over, giving a list of what each element
/// holds there.
pub fn lookup(v: &Value, path: &str) -> Option<Value> {
    let mut cur = v.clone();
    for part in path.split('.') {
        cur = match cur {
            Value::Object(mut m) => m.remove(part)?,
            Value::Array(a) => {
                let got: Vec<Value> = a.iter().filter_map(|x| lookup(x, part)).flat_map(|x| match x {
                    Value::Array(inner) => inner,
                    other => vec![other],
                }).collect();
                if got.is_empty() {
                    return None;
                }
                Value::Array(got)
            }
            _ => return None,
        };
    }
    Some(cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(v: Value) -> Matcher {
        Matcher::compile(&v).unwrap()
    }

    #[test]
    fn each_kind_matches_and_fails() {
        // (matcher, a value it matches, a value it does not)
        let cases = [
            (json!("Shanghai"), json!("Shanghai"), json!("shanghai")),
            (json!(2), json!(2.0), json!(3)),
            (json!({"norm": "Kung Pao chicken"}), json!("kung-pao  CHICKEN!"), json!("kung pao beef")),
            (json!({"norm": "人民广场"}), json!("人民广场。"), json!("人民公园")),
            (json!({"contains": "airport"}), json!("Pudong Airport T2"), json!("Hongqiao station")),
            (json!({"contains": "sichuan"}), json!(["spicy", "sichuan"]), json!(["cantonese"])),
            (json!({"any_of": ["economy", {"norm": "comfort"}]}), json!("Comfort"), json!("premium")),
            (json!({"regex": "^\\d{2}:\\d{2}$"}), json!("07:00"), json!("7 am")),
            (json!({"range": [30, 80]}), json!(43.5), json!(81)),
            (json!({"range": [null, 2]}), json!("2"), json!("3")),
            (json!({"min": 1}), json!(1), json!(0)),
            (json!({"present": true}), json!(""), Value::Null),
            (json!({"not": {"contains": "999"}}), json!("43"), json!("pay 999 now")),
            (json!({"exact": {"a": 1}}), json!({"a": 1.0}), json!({"a": 1, "b": 2})),
        ];
        for (spec, yes, no) in cases {
            let mm = m(spec.clone());
            assert!(mm.matches(&yes), "{spec} should match {yes}");
            assert!(!mm.matches(&no), "{spec} should not match {no}");
        }
    }

    #[test]
    fn absence_is_allowed_only_when_said() {
        assert!(!m(json!("x")).matches_opt(None));
        assert!(m(json!({"norm": "x", "optional": true})).matches_opt(None));
        assert!(!m(json!({"norm": "x", "optional": true})).matches_opt(Some(&json!("y"))));
        assert!(m(json!({"absent": true})).matches_opt(None));
        assert!(!m(json!({"absent": true})).matches_opt(Some(&json!("there"))));
        assert!(m(json!({"optional": true})).matches_opt(Some(&json!(1))));
    }

    #[test]
    fn bad_matchers_are_refused() {
        for bad in [json!({"regex": "("}), json!({"range": [5, 1]}), json!({"range": 3}), json!({"bogus": 1}), json!({"any_of": []}), json!({"norm": "a", "regex": "b"}), json!({"absent": false})] {
            assert!(Matcher::compile(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_reach_into_objects_and_lists() {
        let v = json!({"data": {"items": [{"name": "mapo tofu", "qty": 1}, {"name": "rice", "qty": 2}]}, "restaurant": {"tags": ["sichuan", "spicy"]}});
        assert_eq!(lookup(&v, "data.items.name"), Some(json!(["mapo tofu", "rice"])));
        assert_eq!(lookup(&v, "restaurant.tags"), Some(json!(["sichuan", "spicy"])));
        assert_eq!(lookup(&v, "data.nope"), None);
        assert!(m(json!({"norm": "rice"})).matches(&lookup(&v, "data.items.name").unwrap()));
    }
}
