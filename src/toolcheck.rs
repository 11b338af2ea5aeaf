//! `errand toolcheck`: how often the model's tool calls are valid, with and
//! without grammar constraints, on the same prompts (`evals/toolcalls.json`).
//!
//! For each prompt it records whether a call was made, whether it parsed,
//! whether it validates against the schema, whether it is the expected tool,
//! and whether the expected argument values appear. Greedy decoding, so the
//! figures are reproducible.

use crate::engine::{Engine, EngineError, Prompt, Request};
use crate::prompt::Lang;
use crate::world::Clock;
use crate::template::Message;
use crate::tools::ToolSet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub lang: String,
    pub text: String,
    /// The expected tool, or null for "no call".
    pub tool: Option<String>,
    /// Argument name → text its value should contain (case-insensitive).
    #[serde(default)]
    pub args: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ModeScore {
    pub prompts: usize,
    pub expecting_call: usize,
    /// Replies with at least one parsed call.
    pub made_call: usize,
    /// Parsed calls that validate against the schema.
    pub valid_calls: usize,
    pub total_calls: usize,
    pub malformed: usize,
    /// Expected tool called, with valid arguments containing the expected values.
    pub correct: usize,
    /// "No call" prompts answered without a call.
    pub correct_no_call: usize,
    pub mean_ms: f64,
}

impl ModeScore {
    pub fn validity(&self) -> f64 {
        if self.total_calls + self.malformed == 0 {
            return 0.0;
        }
        self.valid_calls as f64 / (self.total_calls + self.malformed) as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ToolcheckReport {
    pub unconstrained: ModeScore,
    pub constrained: ModeScore,
}

impl std::fmt::Display for ToolcheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{:<44} {:>13} {:>13}", "", "unconstrained", "constrained")?;
        let (u, c) = (&self.unconstrained, &self.constrained);
        let row = |f: &mut std::fmt::Formatter<'_>, name: &str, a: String, b: String| writeln!(f, "{name:<44} {a:>13} {b:>13}");
        row(f, "valid calls / calls attempted", format!("{}/{}", u.valid_calls, u.total_calls + u.malformed), format!("{}/{}", c.valid_calls, c.total_calls + c.malformed))?;
        row(f, "validity rate", format!("{:.0}%", 100.0 * u.validity()), format!("{:.0}%", 100.0 * c.validity()))?;
        row(f, "right tool and arguments (call prompts)", format!("{}/{}", u.correct, u.expecting_call), format!("{}/{}", c.correct, c.expecting_call))?;
        row(f, "no call where none was wanted", format!("{}/{}", u.correct_no_call, u.prompts - u.expecting_call), format!("{}/{}", c.correct_no_call, c.prompts - c.expecting_call))?;
        row(f, "malformed replies", u.malformed.to_string(), c.malformed.to_string())?;
        write!(f, "{:<44} {:>11.0}ms {:>11.0}ms", "mean time per reply", u.mean_ms, c.mean_ms)
    }
}

/// `clock` gives the prompt's date, which the cases' "tomorrow" resolves against.
pub fn run(engine: &Engine, tools: Arc<ToolSet>, cases: &[Case], clock: &Clock) -> Result<ToolcheckReport, EngineError> {
    let mut modes = Vec::new();
    for constrain in [false, true] {
        let mut s = ModeScore { prompts: cases.len(), ..Default::default() };
        let mut total_ms = 0.0;
        for case in cases {
            let lang = Lang::parse(&case.lang).unwrap_or(Lang::En);
            let system = engine.info.prompt.prompts.system(lang, clock.now_s());
            let mut req = Request::chat(Vec::new());
            // Every prompt shares the system prompt and tool list, so one
            // session lets each request reuse that prefix's KV cache.
            req.session = Some(format!("toolcheck-{constrain}"));
            req.prompt = Prompt::Chat {
                messages: vec![Message::system(system), Message::user(case.text.clone())],
                tools: Some(tools.clone()),
                lang: lang.code().into(),
            };
            req.max_tokens = 128;
            req.constrain_tools = constrain;
            let t = std::time::Instant::now();
            let c = engine.generate_blocking(req)?;
            total_ms += t.elapsed().as_secs_f64() * 1000.0;
            s.malformed += c.malformed.len();
            s.total_calls += c.calls.len();
            s.valid_calls += c.calls.iter().filter(|(_, e)| e.is_none()).count();
            if !c.calls.is_empty() {
                s.made_call += 1;
            }
            match &case.tool {
                Some(want) => {
                    s.expecting_call += 1;
                    let ok = c.calls.iter().any(|(call, err)| {
                        err.is_none()
                            && &call.name == want
                            && case.args.iter().all(|(k, v)| {
                                call.arguments
                                    .get(k)
                                    .and_then(|x| x.as_str())
                                    .is_some_and(|x| x.to_lowercase().contains(&v.to_lowercase()))
                            })
                    });
                    s.correct += ok as usize;
                }
                None => s.correct_no_call += (c.calls.is_empty() && c.malformed.is_empty()) as usize,
            }
        }
        s.mean_ms = total_ms / cases.len().max(1) as f64;
        modes.push(s);
    }
    let constrained = modes.pop().expect("two modes");
    let unconstrained = modes.pop().expect("two modes");
    Ok(ToolcheckReport { unconstrained, constrained })
}
