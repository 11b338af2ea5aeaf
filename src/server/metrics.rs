//! Prometheus text exposition (`/metrics`), kept by hand: a few counters,
//! gauges read at scrape time, and histograms with fixed buckets. Label
//! values are escaped as the format requires.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Every metric the server exports: name, type, help.
const FAMILIES: &[(&str, &str, &str)] = &[
    ("errand_http_requests_total", "counter", "HTTP requests by route and status code."),
    ("errand_auth_failures_total", "counter", "Requests and sockets refused for a missing or unknown token."),
    ("errand_ws_connections", "gauge", "Open WebSocket connections."),
    ("errand_ws_frames_total", "counter", "WebSocket frames by direction and type."),
    ("errand_ws_slow_clients_total", "counter", "Connections closed because the client did not read fast enough."),
    ("errand_turns_total", "counter", "Chat inputs handled, by outcome."),
    ("errand_tokens_total", "counter", "Model tokens by kind (prompt, cached, completion)."),
    ("errand_ttft_seconds", "histogram", "Time from an input (or API request) to the first model token."),
    ("errand_turn_seconds", "histogram", "Time to finish one chat input, tool calls included."),
    ("errand_engine_queue_depth", "gauge", "Model requests waiting for the engine."),
    ("errand_kv_cache_bytes", "gauge", "Memory held by cached sessions' KV."),
    ("errand_kv_cache_sessions", "gauge", "Sessions with a cached KV prefix."),
    ("errand_kv_cache_evictions_total", "counter", "Cached sessions evicted to stay within the KV budget."),
    ("errand_tool_calls_total", "counter", "Tool calls by tool and outcome."),
    ("errand_payments_total", "counter", "Payments by status."),
    ("errand_rejected_total", "counter", "Work refused by limit (rate, busy, size, sessions)."),
    ("errand_sessions", "gauge", "Live chat sessions."),
    ("errand_sessions_evicted_total", "counter", "Chat sessions dropped to make room (idle too long, or a user's least recently used)."),
];

const BUCKETS: [f64; 12] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0];

#[derive(Default)]
struct Hist {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, String), f64>>,
    hists: Mutex<BTreeMap<&'static str, Hist>>,
}

fn labels(l: &[(&str, &str)]) -> String {
    if l.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = l
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
        .collect();
    format!("{{{}}}", parts.join(","))
}

fn family(name: &str) -> &'static str {
    FAMILIES
        .iter()
        .find(|f| f.0 == name)
        .map(|f| f.0)
        .unwrap_or_else(|| panic!("metric {name} is not declared in FAMILIES"))
}

impl Metrics {
    pub fn add(&self, name: &str, l: &[(&str, &str)], v: f64) {
        let key = (family(name), labels(l));
        *self.counters.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default() += v;
    }

    pub fn inc(&self, name: &str, l: &[(&str, &str)]) {
        self.add(name, l, 1.0);
    }

    pub fn observe(&self, name: &str, seconds: f64) {
        let mut h = self.hists.lock().unwrap_or_else(|p| p.into_inner());
        let h = h.entry(family(name)).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    /// The exposition text; `gauges` are values read at scrape time.
    pub fn render(&self, gauges: &[(&str, &[(&str, &str)], f64)]) -> String {
        let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let hists = self.hists.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for (name, kind, help) in FAMILIES {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            match *kind {
                "histogram" => {
                    let empty = Hist::default();
                    let h = hists.get(name).unwrap_or(&empty);
                    for (i, b) in BUCKETS.iter().enumerate() {
                        let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", h.counts[i]);
                    }
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
                    let _ = writeln!(out, "{name}_sum {}", h.sum);
                    let _ = writeln!(out, "{name}_count {}", h.count);
                }
                _ => {
                    let mut any = false;
                    for ((n, l), v) in counters.range((*name, String::new())..) {
                        if n != name {
                            break;
                        }
                        let _ = writeln!(out, "{name}{l} {v}");
                        any = true;
                    }
                    for (n, l, v) in gauges {
                        if n == name {
                            let _ = writeln!(out, "{name}{} {v}", labels(l));
                            any = true;
                        }
                    }
                    if !any && *kind == "counter" {
                        let _ = writeln!(out, "{name} 0");
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_types_escaped_labels_and_cumulative_buckets() {
        let m = Metrics::default();
        m.inc("errand_tool_calls_total", &[("tool", "food_search"), ("outcome", "ok")]);
        m.inc("errand_tool_calls_total", &[("tool", "food_search"), ("outcome", "ok")]);
        m.inc("errand_http_requests_total", &[("route", "/v1/\"x\""), ("status", "200")]);
        m.observe("errand_ttft_seconds", 0.3);
        m.observe("errand_ttft_seconds", 3.0);
        let t = m.render(&[("errand_engine_queue_depth", &[], 2.0)]);
        assert!(t.contains("# TYPE errand_ttft_seconds histogram"));
        assert!(t.contains("errand_tool_calls_total{tool=\"food_search\",outcome=\"ok\"} 2"), "{t}");
        assert!(t.contains(r#"route="/v1/\"x\"""#), "{t}");
        assert!(t.contains("errand_ttft_seconds_bucket{le=\"0.25\"} 0"));
        assert!(t.contains("errand_ttft_seconds_bucket{le=\"0.5\"} 1"));
        assert!(t.contains("errand_ttft_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(t.contains("errand_engine_queue_depth 2"));
        assert!(t.contains("errand_payments_total 0"));
    }
}
