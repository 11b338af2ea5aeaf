//! The fuzzing campaign (issue 23): mutated inputs for every parser that
//! reads what someone else wrote — WebSocket frames, OpenAI requests,
//! mini-program manifests (flows included), dialogue YAML, and the model's
//! tool calls and commands. Each input runs under `catch_unwind`; a panic
//! fails the test and prints the input that caused it.
//!
//! Inputs are mutations of a seed corpus (the shipped manifests and
//! dialogues, valid frames and requests, model replies). Half are
//! byte-level (bytes flipped, JSON and YAML tokens inserted, ranges deleted
//! or repeated, two seeds spliced, cut short); half are structure-aware
//! (the seed parsed, nodes swapped, replaced by edge values, removed or
//! repeated, and written back), which reach the checks behind the syntax. A seeded generator makes every run reproducible
//! (`ERRAND_FUZZ_SEED`).
//!
//! CI runs a smoke of 12,000 inputs; the campaign is
//! `scripts/fuzz.sh` (`ERRAND_FUZZ_INPUTS=1000000`).

use crate::util::repo;
use rand::{Rng, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::Instant;

/// Tokens worth inserting: structure, escapes, numbers at the edges, long
/// and deep values, control tokens and text in the three languages.
fn dictionary() -> Vec<String> {
    let mut d: Vec<String> = [
        "{",
        "}",
        "[",
        "]",
        "\"",
        "\\",
        "\\u0000",
        "\\ud800",
        ":",
        ",",
        "null",
        "true",
        "1e999",
        "-0",
        "18446744073709551616",
        "-9223372036854775809",
        "NaN",
        "\"type\"",
        "\"hello\"",
        "\"message\"",
        "\"confirm\"",
        "\"tools\"",
        "\"flows\"",
        "\"steps\"",
        "\"slots\"",
        "\n",
        "\r\n",
        "\t",
        "- ",
        ": ",
        "---",
        "&a",
        "*a",
        "!!binary",
        "? ",
        "|",
        ">",
        "#",
        "<tool_call>",
        "</tool_call>",
        "```json",
        "```",
        "<|im_start|>",
        "<|im_end|>",
        "{sandbox}",
        "start ",
        "set ",
        "pick ",
        "cancel",
        "clarify ",
        "chat",
        "😀",
        "\u{202e}",
        "\u{0}",
        "中文",
        "한국어",
        "ß",
        "\u{fffd}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    d.push("a".repeat(5000));
    d.push("[".repeat(300));
    d.push("{\"a\":".repeat(300));
    d.push("- ".repeat(300));
    d
}

fn mutate(rng: &mut rand::rngs::StdRng, seed: &str, other: &str, dict: &[String]) -> String {
    let mut b = seed.as_bytes().to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = b.len();
        let at = if len == 0 {
            0
        } else {
            rng.random_range(0..=len)
        };
        match rng.random_range(0..7) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                b[i] = rng.random();
            }
            1 | 2 => {
                let t = &dict[rng.random_range(0..dict.len())];
                b.splice(at..at, t.bytes());
            }
            3 if len > 0 => {
                let end = (at + rng.random_range(1..=64)).min(len);
                b.drain(at.min(end)..end);
            }
            4 if len > 0 => {
                let end = (at + rng.random_range(1..=64)).min(len);
                let piece: Vec<u8> = b[at.min(end)..end].to_vec();
                b.splice(at..at, piece);
            }
            5 => {
                let o = other.as_bytes();
                let cut = if o.is_empty() {
                    0
                } else {
                    rng.random_range(0..o.len())
                };
                b.truncate(at);
                b.extend_from_slice(&o[cut..]);
            }
            _ => b.truncate(at),
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// A structure-aware mutation: the seed parsed (JSON, or YAML for the
/// dialogues), a few nodes replaced by another node of the same document,
/// an edge value, or removed or repeated, and written back. These get past
/// the syntax check into the checks behind it.
fn mutate_tree(rng: &mut rand::rngs::StdRng, seed: &str, yaml: bool, dict: &[String]) -> Option<String> {
    use serde_json::{json, Value};
    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Array(a) => a.iter().map(count).sum(),
            Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }
    fn get(v: &Value, n: &mut usize) -> Option<Value> {
        if *n == 0 {
            return Some(v.clone());
        }
        *n -= 1;
        match v {
            Value::Array(a) => a.iter().find_map(|x| get(x, n)),
            Value::Object(o) => o.values().find_map(|x| get(x, n)),
            _ => None,
        }
    }
    fn at(v: &mut Value, n: &mut usize, f: &mut dyn FnMut(&mut Value)) -> bool {
        if *n == 0 {
            f(v);
            return true;
        }
        *n -= 1;
        match v {
            Value::Array(a) => a.iter_mut().any(|x| at(x, n, f)),
            Value::Object(o) => o.values_mut().any(|x| at(x, n, f)),
            _ => false,
        }
    }
    let mut v: Value = if yaml { serde_norway::from_str(seed).ok()? } else { serde_json::from_str(seed).ok()? };
    for _ in 0..rng.random_range(1..=3) {
        let total = count(&v);
        let donor = get(&v, &mut rng.random_range(0..total)).unwrap_or(Value::Null);
        let choice = rng.random_range(0..9);
        let pick = rng.random_range(0..1000usize);
        let new = match choice {
            0 => donor,
            1 => json!(dict[pick % dict.len()]),
            2 => json!([i64::MIN, -1, 0, 1, i64::MAX][pick % 5]),
            3 => json!(u64::MAX),
            4 => Value::Null,
            5 => json!({}),
            6 => json!([]),
            7 => json!(true),
            _ => Value::Null,
        };
        at(&mut v, &mut rng.random_range(0..total), &mut |node| {
            if choice < 8 {
                *node = new.clone();
                return;
            }
            // Remove a key or an element, or repeat one.
            match node {
                Value::Object(o) if !o.is_empty() => {
                    let key = o.keys().nth(pick % o.len()).cloned().unwrap_or_default();
                    o.remove(&key);
                }
                Value::Array(a) if !a.is_empty() => {
                    let i = pick % a.len();
                    if pick % 2 == 0 {
                        a.remove(i);
                    } else {
                        let x = a[i].clone();
                        a.push(x);
                    }
                }
                other => *other = Value::Null,
            }
        });
    }
    if yaml { serde_norway::to_string(&v).ok() } else { serde_json::to_string(&v).ok() }
}

struct Target {
    name: &'static str,
    seeds: Vec<String>,
    /// Whether seeds parse as YAML (else JSON) for the structure-aware mutations.
    yaml: bool,
    /// Runs one input; true when the parser accepted it (how deep the
    /// campaign gets past the first syntax check).
    run: Box<dyn Fn(&str, &mut rand::rngs::StdRng) -> bool>,
}

fn targets() -> Vec<Target> {
    let read_dir = |dir: &str, ext: &str| -> Vec<String> {
        let mut files: Vec<_> = std::fs::read_dir(repo().join(dir))
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == ext))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    };
    let mut manifests = read_dir("tools", "json");
    manifests.push(std::fs::read_to_string(repo().join("tests/fixtures/florist.json")).unwrap());
    let dialogues: Vec<String> = read_dir("evals/dialogues", "yaml")
        .into_iter()
        .step_by(4)
        .collect();
    let frames = [
        r#"{"type":"hello","v":1,"token":"tok-alice-0123456789abcdef","session":null,"last_seq":0,"lang":"zh"}"#,
        r#"{"type":"message","id":"m1","text":"帮我订明天上午从上海到杭州的高铁"}"#,
        r#"{"type":"confirm","id":"c1","token":"0123456789abcdef0123456789abcdef"}"#,
        r#"{"type":"decline","id":"d1","token":"0123456789abcdef0123456789abcdef"}"#,
        r#"{"type":"select","id":"s1","card":"c3","option":"sh01"}"#,
        r#"{"type":"cancel","id":"m1"}"#,
        r#"{"type":"resume","session":"s-0123","last_seq":18446744073709551615}"#,
        r#"{"type":"ping"}"#,
    ];
    let requests = [
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":40,"temperature":0}"#,
        r#"{"model":"m","stream":true,"stop":["\n"],"messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"weather?"}]}],"tools":[{"type":"function","function":{"name":"get_weather","description":"Weather","parameters":{"type":"object","properties":{"city":{"type":"string","enum":["Paris","Seoul"]}},"required":["city"]}}}],"tool_choice":"required"}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},{"role":"tool","tool_call_id":"call_1","content":"{\"ok\":true}"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"a":{"type":"integer","minimum":0}}}}}],"tool_choice":{"type":"function","function":{"name":"f"}},"n":1,"seed":7,"top_p":0.9}"#,
    ];
    let replies = [
        "<tool_call>\n{\"name\": \"food_search_restaurants\", \"arguments\": {\"near\": \"People's Square\", \"dish\": \"kung pao chicken\"}}\n</tool_call>",
        "```json\n{\"name\": \"ride_quote\", \"arguments\": {\"pickup\": \"Bund\", \"dropoff\": \"PVG\"}}\n```",
        "[{\"name\": \"tickets_search_trains\", \"arguments\": {\"from\": \"上海\", \"to\": \"杭州\", \"date\": \"2026-12-09\"}}]",
        "Sure! The capital of France is Paris.",
        "start order_food\nset place 강남역\nset dish 비빔밥\nset quantity 2\nset address 강남대로 396\npick 2\ncancel\nclarify order_food book_ride\nchat\nnone",
    ];
    vec![
        Target {
            name: "websocket frames",
            yaml: false,
            seeds: frames.iter().map(|s| s.to_string()).collect(),
            run: Box::new(|s, _| errand::server::ws::frame_kind(s).is_ok()),
        },
        Target {
            name: "OpenAI requests",
            yaml: false,
            seeds: requests.iter().map(|s| s.to_string()).collect(),
            run: Box::new(|s, _| {
                errand::server::openai::parse_body(s.as_bytes())
                    .is_ok_and(|r| errand::server::openai::prepare(r, "m").is_ok())
            }),
        },
        Target {
            name: "manifests",
            yaml: false,
            seeds: manifests,
            run: Box::new(|s, _| errand::tools::parse_manifest(s, Path::new("fuzz.json")).is_ok()),
        },
        Target {
            name: "dialogue YAML",
            yaml: true,
            seeds: dialogues,
            run: Box::new(|s, _| errand::eval::dialogue::parse(s, Path::new("fuzz.yaml")).is_ok()),
        },
        Target {
            name: "tool calls and commands",
            yaml: false,
            seeds: replies.iter().map(|s| s.to_string()).collect(),
            run: Box::new(|s, rng| {
                let _ = errand::tools::parse::parse_reply(s);
                // The same text streamed in random pieces (on char boundaries).
                let mut stream = errand::tools::parse::CallStream::new();
                let chars: Vec<char> = s.chars().collect();
                let mut i = 0;
                while i < chars.len() {
                    let n = rng.random_range(1..=16).min(chars.len() - i);
                    let _ = stream.push(&chars[i..i + n].iter().collect::<String>());
                    i += n;
                }
                let _ = stream.finish();
                let _ = errand::dialogue::command::spans(s);
                let calls = errand::tools::parse::parse_reply(s)
                    .iter()
                    .any(|i| matches!(i, errand::tools::parse::StreamItem::Call(_)));
                calls || !errand::dialogue::command::parse(s).is_empty()
            }),
        },
    ]
}

#[test]
fn fuzz_the_parsers() {
    let total: usize = std::env::var("ERRAND_FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12_000);
    let seed: u64 = std::env::var("ERRAND_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(23);
    let dict = dictionary();
    let targets = targets();
    let per = total.div_ceil(targets.len());
    let mut failures = Vec::new();
    let started = Instant::now();
    let (mut done, mut all_panics) = (0, 0);
    for (k, t) in targets.iter().enumerate() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(k as u64));
        let t0 = Instant::now();
        let (mut panics, mut accepted) = (0, 0);
        for i in 0..per {
            let a = &t.seeds[rng.random_range(0..t.seeds.len())];
            let b = &t.seeds[rng.random_range(0..t.seeds.len())];
            // Every hundredth input is a seed as it is: the valid path runs too.
            let input = if i % 100 == 0 {
                a.clone()
            } else if rng.random_bool(0.5) {
                mutate_tree(&mut rng, a, t.yaml, &dict).unwrap_or_else(|| mutate(&mut rng, a, b, &dict))
            } else {
                mutate(&mut rng, a, b, &dict)
            };
            let mut run_rng = rand::rngs::StdRng::seed_from_u64(i as u64);
            match catch_unwind(AssertUnwindSafe(|| (t.run)(&input, &mut run_rng))) {
                Ok(ok) => accepted += usize::from(ok),
                Err(_) => {
                    panics += 1;
                    if failures.len() < 5 {
                        failures.push(format!(
                            "{}: input {i}: {:?}",
                            t.name,
                            input.chars().take(300).collect::<String>()
                        ));
                    }
                }
            }
        }
        done += per;
        all_panics += panics;
        let s = t0.elapsed().as_secs_f64();
        println!(
            "fuzz {:<24} {per:>9} inputs  {accepted:>8} accepted  {panics} panics  {:>8.0} inputs/s",
            t.name,
            per as f64 / s.max(1e-9)
        );
    }
    println!(
        "fuzz total {done} inputs in {:.1} s, seed {seed}, {} panics",
        started.elapsed().as_secs_f64(),
        all_panics
    );
    assert!(
        failures.is_empty(),
        "inputs that panicked:\n{}",
        failures.join("\n")
    );
}
