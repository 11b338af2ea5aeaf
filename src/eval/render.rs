//! Rendering a [`Report`]: a plain-text summary for the terminal, and one
//! self-contained HTML page (inline CSS and SVG charts; no scripts, fonts or
//! network, so it works offline). Every piece of text taken from the data —
//! dialogue text, model output, tool arguments — is HTML-escaped.

use crate::world::money::grouped as digits;
use super::report::{Report, Row, TrialResult};
use super::score::{Code, Failure, Payment, TurnRecord};
use std::collections::HashMap;
use std::fmt::Write as _;

/// `write!` into a `String`, which cannot fail.
macro_rules! w {
    ($dst:expr, $($arg:tt)*) => {{
        let _ = write!($dst, $($arg)*);
    }};
}

// ---------------------------------------------------------------------------
// Shared helpers

/// One dialogue's runs, in trial order.
struct Group<'a> {
    id: &'a str,
    lang: &'a str,
    domain: &'a str,
    runs: Vec<&'a TrialResult>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Every run passed.
    Pass,
    /// Some runs passed.
    Flaky,
    /// No run passed.
    Fail,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Flaky => "flaky",
            Status::Fail => "FAIL",
        }
    }

    fn class(self) -> &'static str {
        match self {
            Status::Pass => "ok",
            Status::Flaky => "flaky",
            Status::Fail => "bad",
        }
    }
}

impl<'a> Group<'a> {
    fn passes(&self) -> usize {
        self.runs.iter().filter(|r| r.passed).count()
    }

    fn status(&self) -> Status {
        let p = self.passes();
        if p == self.runs.len() {
            Status::Pass
        } else if p == 0 {
            Status::Fail
        } else {
            Status::Flaky
        }
    }

    /// The distinct reason codes over all runs, in code order.
    fn codes(&self) -> Vec<Code> {
        let mut v: Vec<Code> = self.runs.iter().flat_map(|r| r.failures.iter().map(|f| f.code)).collect();
        v.sort();
        v.dedup();
        v
    }

    /// The first failure of the first run that has one.
    fn first_failure(&self) -> Option<&'a Failure> {
        self.runs.iter().copied().find_map(|r| r.failures.first())
    }
}

/// The results grouped by dialogue id, in order of first appearance.
fn groups(results: &[TrialResult]) -> Vec<Group<'_>> {
    let mut out: Vec<Group<'_>> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for r in results {
        let i = *index.entry(r.id.as_str()).or_insert_with(|| {
            out.push(Group { id: &r.id, lang: &r.lang, domain: &r.domain, runs: Vec::new() });
            out.len() - 1
        });
        out[i].runs.push(r);
    }
    for g in &mut out {
        g.runs.sort_by_key(|r| r.trial);
    }
    out
}

/// How many pass^k columns to show.
fn max_k(r: &Report) -> usize {
    r.summary.pass_hat.len().max(r.trials).max(1)
}

fn hat(v: &[f64], i: usize) -> Option<f64> {
    v.get(i).copied()
}

/// Reason codes, most frequent first (ties in code order).
fn sorted_codes(r: &Report) -> Vec<(Code, usize)> {
    let mut v = r.summary.codes.clone();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

/// Left-aligned in `w` characters.
fn pad_right(s: &str, w: usize) -> String {
    format!("{s}{}", " ".repeat(w.saturating_sub(chars(s))))
}

/// Right-aligned in `w` characters.
fn pad_left(s: &str, w: usize) -> String {
    format!("{}{s}", " ".repeat(w.saturating_sub(chars(s))))
}

/// On one line (runs of whitespace become one space) and at most `n`
/// characters, the last an ellipsis when cut.
fn clip(s: &str, n: usize) -> String {
    let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if chars(&flat) <= n {
        flat
    } else {
        let mut c: String = flat.chars().take(n.saturating_sub(1)).collect();
        c.push('…');
        c
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn count(x: f64) -> String {
    format!("{x:.0}")
}

/// Milliseconds as seconds with one decimal, `-` when unknown.
fn secs(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".to_string(), |v| format!("{:.1}", v / 1000.0))
}

/// Like [`secs`], with the unit.
fn secs_unit(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".to_string(), |v| format!("{:.1} s", v / 1000.0))
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn duration(s: f64) -> String {
    if s >= 90.0 {
        format!("{s:.0} s ({:.1} min)", s / 60.0)
    } else {
        format!("{s:.1} s")
    }
}

/// `t<turn> detail`, the detail clipped to `n` characters.
fn failure_line(f: &Failure, n: usize) -> String {
    match f.turn {
        Some(t) => format!("t{t} {}", clip(&f.detail, n)),
        None => clip(&f.detail, n),
    }
}

fn payment(p: &Payment) -> String {
    let mut s = format!("payment {} {} {}", p.status, p.amount, p.out_trade_no);
    if let Some(r) = &p.reply_to {
        let _ = write!(s, " (answering {r})");
    }
    s
}

/// `pass^1 72.3%  pass^3 55.0%  (61 dialogues × 3 trials, 183 runs, model …, 1234 s)`
fn headline(r: &Report) -> String {
    let s = &r.summary;
    let mut parts = vec![format!("pass^1 {}", pct(hat(&s.pass_hat, 0).unwrap_or(0.0)))];
    if s.pass_hat.len() > 1 {
        let k = s.pass_hat.len();
        parts.push(format!("pass^{k} {}", pct(s.pass_hat[k - 1])));
    }
    format!(
        "{}  ({} dialogue{} × {} trial{}, {} run{}, model {}, {:.0} s)",
        parts.join("  "),
        s.dialogues,
        plural(s.dialogues),
        r.trials,
        plural(r.trials),
        s.runs,
        plural(s.runs),
        r.model,
        r.wall_s
    )
}

// ---------------------------------------------------------------------------
// Terminal

/// Rows of cells as lines: columns padded to their widest cell (counted in
/// characters), two spaces apart; `right[i]` right-aligns column `i`.
fn align(rows: &[Vec<String>], right: &[bool]) -> Vec<String> {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut w = vec![0usize; n];
    for row in rows {
        for (i, c) in row.iter().enumerate() {
            w[i] = w[i].max(chars(c));
        }
    }
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(i, c)| if right.get(i).copied().unwrap_or(false) { pad_left(c, w[i]) } else { pad_right(c, w[i]) })
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect()
}

fn row_head(key: &str, k: usize) -> Vec<String> {
    let mut v = vec![key.to_string(), "dialogues".into(), "runs".into()];
    v.extend((1..=k).map(|i| format!("pass^{i}")));
    v.push("TTFT p50 s".into());
    v.push("turn p50 s".into());
    v
}

fn row_cells(row: &Row, k: usize) -> Vec<String> {
    let mut v = vec![row.key.clone(), row.dialogues.to_string(), row.runs.to_string()];
    v.extend((0..k).map(|i| hat(&row.pass_hat, i).map_or_else(|| "-".to_string(), pct)));
    v.push(secs(row.ttft_p50_ms));
    v.push(secs(row.turn_p50_ms));
    v
}

/// A plain-text report for a terminal (no colours).
pub fn terminal(r: &Report) -> String {
    let s = &r.summary;
    let k = max_k(r);
    let gs = groups(&r.results);
    let mut out = String::new();
    w!(
        out,
        "errand {} eval · model {} · server {} · started {} · {} trial{} · temperature {}\n",
        r.errand_version,
        r.model,
        r.server,
        r.started,
        r.trials,
        plural(r.trials),
        r.temperature
    );

    out.push_str("\ndialogues\n");
    if gs.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let rows: Vec<Vec<String>> = gs
            .iter()
            .map(|g| vec![g.status().word().to_string(), g.id.to_string(), g.lang.to_string(), g.domain.to_string(), format!("{}/{}", g.passes(), g.runs.len())])
            .collect();
        let lines = align(&rows, &[false, false, false, false, true]);
        for (g, line) in gs.iter().zip(lines) {
            out.push_str("  ");
            out.push_str(&line);
            if g.status() != Status::Pass {
                let codes: Vec<&str> = g.codes().into_iter().map(Code::as_str).collect();
                if !codes.is_empty() {
                    w!(out, "  {}", codes.join(","));
                }
                if let Some(f) = g.first_failure() {
                    w!(out, "  {}", failure_line(f, 90));
                }
            }
            out.push('\n');
        }
    }

    for (title, key, rows) in [("by domain", "domain", &s.by_domain), ("by language", "lang", &s.by_lang)] {
        w!(out, "\n{title}\n");
        if rows.is_empty() {
            out.push_str("  (none)\n");
            continue;
        }
        let mut t = vec![row_head(key, k)];
        t.extend(rows.iter().map(|row| row_cells(row, k)));
        let right: Vec<bool> = (0..t[0].len()).map(|i| i > 0).collect();
        for line in align(&t, &right) {
            w!(out, "  {line}\n");
        }
    }

    out.push_str("\nreason codes (runs that had them)\n");
    let codes = sorted_codes(r);
    if codes.is_empty() {
        out.push_str("  none\n");
    } else {
        let t: Vec<Vec<String>> = codes
            .iter()
            .map(|(c, n)| vec![c.as_str().to_string(), n.to_string(), format!("{} of runs", pct(*n as f64 / s.runs.max(1) as f64))])
            .collect();
        for line in align(&t, &[false, true, true]) {
            w!(out, "  {line}\n");
        }
    }

    let l = &s.latency;
    w!(out, "\nlatency ({} turn{})\n", l.turns, plural(l.turns));
    w!(out, "  TTFT  p50 {}  p90 {}\n", secs_unit(l.ttft_p50_ms), secs_unit(l.ttft_p90_ms));
    w!(out, "  turn  p50 {}  p90 {}  max {}\n", secs_unit(l.turn_p50_ms), secs_unit(l.turn_p90_ms), secs_unit(l.turn_max_ms));
    w!(out, "tokens  prompt {}  cached {}  completion {}\n", digits(s.tokens.prompt), digits(s.tokens.cached), digits(s.tokens.completion));

    out.push('\n');
    out.push_str(&headline(r));
    out.push('\n');
    out
}

// ---------------------------------------------------------------------------
// HTML

const GREEN: &str = "#2da44e";
const BLUE: &str = "#0969da";
const RED: &str = "#cf222e";
const AMBER: &str = "#bf8700";

const CSS: &str = "
:root{--ok:#1a7f37;--bad:#cf222e;--badbg:#ffebe9;--mid:#9a6700;--fg:#1f2328;--muted:#656d76;--line:#d0d7de;--soft:#f6f8fa}
*{box-sizing:border-box}
body{margin:0 auto;max-width:1400px;padding:24px 28px 48px;font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,'Noto Sans','PingFang SC','Microsoft YaHei','Malgun Gothic',sans-serif;color:var(--fg);background:#fff}
h1{font-size:22px;margin:0 0 10px;font-weight:650}
h2{font-size:16px;margin:32px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--line)}
.muted{color:var(--muted)}
code{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;word-break:break-all}
.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:0}
.meta dt{color:var(--muted)}
.meta dd{margin:0}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:20px 0 8px}
.card{border:1px solid var(--line);border-radius:8px;padding:8px 16px;min-width:130px;background:var(--soft)}
.card .k{font-size:12px;color:var(--muted)}
.card .v{font-size:26px;font-weight:650;font-variant-numeric:tabular-nums}
.charts{display:grid;align-items:start;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:14px}
.chart{border:1px solid var(--line);border-radius:8px;padding:10px 14px}
.chart h3{margin:0 0 8px;font-size:13px;font-weight:600;color:var(--muted)}
svg{display:block;width:100%;height:auto;max-width:680px}
svg text{font-size:11px;fill:var(--fg)}
svg text.val,svg text.muted{fill:var(--muted)}
svg .track{fill:#eef1f4}
svg .axis{stroke:var(--line);stroke-width:1}
.stats{color:var(--muted);font-variant-numeric:tabular-nums}
.stats b{color:var(--fg);font-weight:600}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:right;vertical-align:top}
th{background:var(--soft);font-weight:600}
th:first-child,td:first-child{text-align:left}
.dlgs{border:1px solid var(--line);border-radius:8px;overflow:hidden;margin-top:8px}
.row{display:grid;grid-template-columns:14px minmax(160px,2fr) 44px minmax(70px,120px) 60px minmax(0,4fr);gap:10px;align-items:baseline;padding:5px 10px}
.row.head{background:var(--soft);font-weight:600;border-bottom:1px solid var(--line)}
.dlg{border-bottom:1px solid var(--line)}
.dlg:last-child{border-bottom:0}
.dlg>summary{list-style:none;cursor:pointer}
.dlg>summary::-webkit-details-marker{display:none}
.dlg>summary:hover{background:var(--soft)}
.caret{color:var(--muted);display:inline-block;transition:transform .1s}
.dlg[open] .caret{transform:rotate(90deg)}
.id{font-weight:600;overflow-wrap:anywhere}
.why{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.pill{display:inline-block;min-width:40px;text-align:center;border-radius:10px;padding:0 7px;font-size:12px;font-weight:600;color:#fff;background:var(--ok)}
.pill.flaky{background:var(--mid)}
.pill.bad{background:var(--bad)}
.code{display:inline-block;font:11px/1.5 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;padding:0 5px;border-radius:4px;background:var(--badbg);color:var(--bad)}
.body{padding:4px 12px 12px 34px;background:#fcfcfd;border-top:1px dashed var(--line)}
.trial{border-left:3px solid var(--ok);padding:2px 0 2px 10px;margin:10px 0}
.trial.bad{border-left-color:var(--bad)}
.trial-head{margin-bottom:4px}
.fails{margin:4px 0 8px;padding-left:18px}
.fails li{margin:2px 0}
.turn{color:var(--muted);font-weight:600}
.fatal{color:var(--bad)}
table.turns{width:100%;font-size:12.5px;background:#fff;table-layout:fixed}
table.turns td{overflow-wrap:anywhere}
.c-t{width:34px} .c-action{width:17%} .c-calls{width:24%} .c-conf{width:15%} .c-err{width:11%} .c-s{width:60px}
table.turns th,table.turns td{text-align:left;padding:3px 8px}
table.turns td.num,table.turns th.num{text-align:right;white-space:nowrap}
table.turns tr.bad td{background:var(--badbg)}
.said{white-space:pre-wrap}
.shown{color:var(--muted);margin-top:4px}
.call{margin:1px 0}
.err{color:var(--bad)}
#only-failing{margin:0 6px 0 0}
#only-failing:checked~.dlgs .dlg.ok{display:none}
footer{margin-top:32px;color:var(--muted);font-size:12px}
";

/// HTML-escapes `& < > " '`.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// A light background from red (0) to green (1).
fn tint(p: f64) -> String {
    format!("background:hsl({:.0},60%,92%)", 130.0 * p.clamp(0.0, 1.0))
}

fn no_data() -> String {
    r#"<svg viewBox="0 0 520 40" role="img"><text x="260" y="24" text-anchor="middle" class="muted">no data</text></svg>"#.to_string()
}

/// Horizontal bars: one group per label, one bar per series in it;
/// `values[label][series]`, scaled to `max`.
fn hbars(labels: &[String], series: &[(String, &str)], values: &[Vec<f64>], max: f64, fmt: fn(f64) -> String) -> String {
    if labels.is_empty() || series.is_empty() {
        return no_data();
    }
    let width = 520.0_f64;
    let label_w = (labels.iter().map(|l| chars(l).min(28)).max().unwrap_or(0) as f64 * 6.5 + 12.0).clamp(48.0, 200.0);
    let value_w = 50.0;
    let area = width - label_w - value_w;
    let (bar_h, gap, group_gap) = (14.0_f64, 2.0_f64, 10.0_f64);
    let ns = series.len() as f64;
    let group_h = ns * bar_h + (ns - 1.0) * gap;
    let legend_h = if series.len() > 1 { 22.0 } else { 0.0 };
    let height = legend_h + labels.len() as f64 * (group_h + group_gap);
    let mut s = String::new();
    w!(s, r#"<svg viewBox="0 0 {width} {height:.1}" role="img">"#);
    if series.len() > 1 {
        for (i, (name, color)) in series.iter().enumerate() {
            let x = label_w + i as f64 * 110.0;
            w!(s, r#"<rect x="{x:.1}" y="4" width="10" height="10" rx="2" fill="{color}"/><text x="{:.1}" y="13">{}</text>"#, x + 14.0, escape(name));
        }
    }
    for (gi, label) in labels.iter().enumerate() {
        let y0 = legend_h + gi as f64 * (group_h + group_gap) + group_gap / 2.0;
        w!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#, label_w - 6.0, y0 + group_h / 2.0 + 4.0, escape(&clip(label, 28)));
        for (si, (name, color)) in series.iter().enumerate() {
            let v = values.get(gi).and_then(|row| row.get(si)).copied().unwrap_or(0.0);
            let bw = if max > 0.0 { (v / max).clamp(0.0, 1.0) * area } else { 0.0 };
            let y = y0 + si as f64 * (bar_h + gap);
            w!(s, r#"<rect x="{label_w:.1}" y="{y:.1}" width="{area:.1}" height="{bar_h}" rx="2" class="track"/>"#);
            w!(
                s,
                r#"<rect x="{label_w:.1}" y="{y:.1}" width="{bw:.1}" height="{bar_h}" rx="2" fill="{color}"><title>{}</title></rect>"#,
                escape(&format!("{label} · {name}: {}", fmt(v)))
            );
            w!(s, r#"<text x="{:.1}" y="{:.1}" class="val">{}</text>"#, label_w + bw + 4.0, y + bar_h - 3.0, escape(&fmt(v)));
        }
    }
    s.push_str("</svg>");
    s
}

/// The smallest of 1, 2, 2.5, 5 × 10ⁿ that is at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw.is_nan() || raw <= 0.0 || raw.is_infinite() {
        return 0.1;
    }
    let mag = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0] {
        if m * mag >= raw * (1.0 - 1e-9) {
            return m * mag;
        }
    }
    10.0 * mag
}

/// A number with at most two decimals, trailing zeros dropped.
fn short_num(x: f64) -> String {
    let s = format!("{x:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

/// Counts of `values` (seconds) in about ten buckets of a round width.
fn buckets(values: &[f64]) -> (f64, Vec<usize>) {
    let max = values.iter().copied().fold(0.0_f64, f64::max);
    let step = nice_step(max / 10.0);
    let n = ((max / step - 1e-9).ceil().max(0.0) as usize).max(1);
    let mut counts = vec![0usize; n];
    for &v in values {
        let i = ((v.max(0.0) / step).floor() as usize).min(n - 1);
        counts[i] += 1;
    }
    (step, counts)
}

/// A histogram of `values` in seconds.
fn histogram(values: &[f64], color: &str, what: &str) -> String {
    if values.is_empty() {
        return no_data();
    }
    let (step, counts) = buckets(values);
    let n = counts.len();
    let (width, height) = (520.0_f64, 200.0_f64);
    let (left, right, top, bottom) = (34.0_f64, 12.0_f64, 16.0_f64, 34.0_f64);
    let (pw, ph) = (width - left - right, height - top - bottom);
    let cmax = counts.iter().copied().max().unwrap_or(1).max(1);
    let bw = pw / n as f64;
    let base = top + ph;
    let mut s = String::new();
    w!(s, r#"<svg viewBox="0 0 {width} {height}" role="img">"#);
    w!(s, r#"<line x1="{left}" y1="{base}" x2="{:.1}" y2="{base}" class="axis"/>"#, width - right);
    w!(s, r#"<line x1="{left}" y1="{top}" x2="{:.1}" y2="{top}" class="axis" stroke-dasharray="3 3"/>"#, width - right);
    w!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end" class="muted">{cmax}</text>"#, left - 5.0, top + 4.0);
    w!(s, r#"<text x="{:.1}" y="{base:.1}" text-anchor="end" class="muted">0</text>"#, left - 5.0);
    for (i, &c) in counts.iter().enumerate() {
        let lo = i as f64 * step;
        let bh = c as f64 / cmax as f64 * ph;
        let x = left + i as f64 * bw;
        w!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{color}"><title>{}–{} s: {c} {}</title></rect>"#,
            x + 1.0,
            base - bh,
            (bw - 2.0).max(1.0),
            short_num(lo),
            short_num(lo + step),
            escape(what)
        );
        if c > 0 {
            w!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="val">{c}</text>"#, x + bw / 2.0, base - bh - 3.0);
        }
    }
    let every = if n > 10 { 2 } else { 1 };
    for i in (0..=n).step_by(every) {
        w!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="muted">{}</text>"#, left + i as f64 * bw, base + 14.0, short_num(i as f64 * step));
    }
    w!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end" class="muted">seconds</text>"#, width - right, height - 4.0);
    s.push_str("</svg>");
    s
}

fn chart(h: &mut String, title: &str, svg: &str) {
    w!(h, "<div class=\"chart\"><h3>{}</h3>{svg}</div>", escape(title));
}

fn card(h: &mut String, label: &str, value: &str, style: Option<String>) {
    let style = style.map(|s| format!(" style=\"{s}\"")).unwrap_or_default();
    w!(h, "<div class=\"card\"{style}><div class=\"k\">{}</div><div class=\"v\">{}</div></div>", escape(label), escape(value));
}

fn html_rows(h: &mut String, first: &str, rows: &[Row], k: usize) {
    if rows.is_empty() {
        h.push_str("<p class=\"muted\">no results</p>");
        return;
    }
    w!(h, "<table><thead><tr><th>{}</th><th>dialogues</th><th>runs</th>", escape(first));
    for i in 1..=k {
        w!(h, "<th>pass^{i}</th>");
    }
    h.push_str("<th>TTFT p50 (s)</th><th>turn p50 (s)</th></tr></thead><tbody>");
    for row in rows {
        w!(h, "<tr><td>{}</td><td>{}</td><td>{}</td>", escape(&row.key), row.dialogues, row.runs);
        for i in 0..k {
            match hat(&row.pass_hat, i) {
                Some(p) => w!(h, "<td style=\"{}\">{}</td>", tint(p), pct(p)),
                None => h.push_str("<td>-</td>"),
            }
        }
        w!(h, "<td>{}</td><td>{}</td></tr>", secs(row.ttft_p50_ms), secs(row.turn_p50_ms));
    }
    h.push_str("</tbody></table>");
}

fn html_turn(h: &mut String, i: usize, t: &TurnRecord, bad: bool) {
    w!(h, "<tr{}><td class=\"num\">{i}</td><td>{}</td><td>", if bad { " class=\"bad\"" } else { "" }, escape(&t.action));
    for c in &t.calls {
        w!(h, "<div class=\"call\"><b>{}</b> <code>{}</code></div>", escape(&c.tool), escape(&c.arguments.to_string()));
    }
    h.push_str("</td><td><div class=\"said\">");
    h.push_str(&escape(&t.said));
    h.push_str("</div>");
    if !t.shown.trim().is_empty() {
        w!(h, "<div class=\"shown\">shown: {}</div>", escape(&t.shown));
    }
    h.push_str("</td><td>");
    for c in &t.confirmations {
        w!(h, "<div><b>{}</b> {} {}", escape(&c.tool), c.amount, escape(&c.currency));
        if !c.summary.is_empty() {
            w!(h, "<div class=\"muted\">{}</div>", escape(&c.summary));
        }
        h.push_str("</div>");
    }
    for p in &t.payments {
        w!(h, "<div class=\"muted\">{}</div>", escape(&payment(p)));
    }
    h.push_str("</td><td class=\"err\">");
    for e in &t.errors {
        w!(h, "<div>{}</div>", escape(e));
    }
    let latency = if t.input_id.is_some() { Some(t.latency_ms) } else { None };
    w!(h, "</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>", secs(t.ttft_ms), secs(latency));
}

fn html_trial(h: &mut String, t: &TrialResult) {
    let bad_turns: Vec<usize> = t.failures.iter().filter_map(|f| f.turn).collect();
    w!(
        h,
        "<div class=\"trial {}\"><div class=\"trial-head\"><b>trial {}</b> · {} · {:.1} s",
        if t.passed { "ok" } else { "bad" },
        t.trial,
        if t.passed { "passed" } else { "failed" },
        t.wall_ms / 1000.0
    );
    if t.simulated {
        h.push_str(" · simulated user");
        if let Some(e) = &t.sim_end {
            w!(h, " ({})", escape(e));
        }
    }
    h.push_str("</div>");
    if !t.failures.is_empty() {
        h.push_str("<ul class=\"fails\">");
        for f in &t.failures {
            w!(h, "<li><span class=\"code\">{}</span> ", f.code.as_str());
            if let Some(n) = f.turn {
                w!(h, "<span class=\"turn\">t{n}</span> ");
            }
            w!(h, "{}</li>", escape(&f.detail));
        }
        h.push_str("</ul>");
    }
    if let Some(f) = &t.transcript.fatal {
        w!(h, "<p class=\"fatal\">fatal: {}</p>", escape(f));
    }
    if t.transcript.turns.is_empty() {
        h.push_str("<p class=\"muted\">no turns recorded</p>");
    } else {
        h.push_str(
            "<table class=\"turns\"><colgroup><col class=\"c-t\"><col class=\"c-action\"><col class=\"c-calls\"><col>\
             <col class=\"c-conf\"><col class=\"c-err\"><col class=\"c-s\"><col class=\"c-s\"></colgroup><thead><tr><th class=\"num\">t</th><th>action</th><th>calls</th><th>said</th>\
             <th>confirmations</th><th>errors</th><th class=\"num\">TTFT s</th><th class=\"num\">turn s</th></tr></thead><tbody>",
        );
        for (i, rec) in t.transcript.turns.iter().enumerate() {
            html_turn(h, i, rec, bad_turns.contains(&i));
        }
        h.push_str("</tbody></table>");
    }
    if !t.transcript.pushed_payments.is_empty() {
        let ps: Vec<String> = t.transcript.pushed_payments.iter().map(payment).collect();
        w!(h, "<p class=\"muted\">outside any turn: {}</p>", escape(&ps.join("; ")));
    }
    h.push_str("</div>");
}

fn html_dialogues(h: &mut String, gs: &[Group<'_>]) {
    if gs.is_empty() {
        h.push_str("<p class=\"muted\">no dialogues were run</p>");
        return;
    }
    let failing = gs.iter().filter(|g| g.status() != Status::Pass).count();
    w!(
        h,
        "<input type=\"checkbox\" id=\"only-failing\"><label for=\"only-failing\">only the {failing} dialogue{} with a failed run</label>",
        plural(failing)
    );
    h.push_str(
        "<div class=\"dlgs\"><div class=\"row head\"><span></span><span>id</span><span>lang</span><span>domain</span>\
         <span>passed</span><span>reason codes · first failure</span></div>",
    );
    for g in gs {
        let st = g.status();
        w!(
            h,
            "<details class=\"dlg {}\"><summary><span class=\"row\"><span class=\"caret\">▸</span><span class=\"id\">{}</span>\
             <span>{}</span><span>{}</span><span><span class=\"pill {}\">{}/{}</span></span><span class=\"why\">",
            st.class(),
            escape(g.id),
            escape(g.lang),
            escape(g.domain),
            st.class(),
            g.passes(),
            g.runs.len()
        );
        for c in g.codes() {
            w!(h, "<span class=\"code\">{}</span> ", c.as_str());
        }
        if let Some(f) = g.first_failure() {
            w!(h, "<span class=\"muted\">{}</span>", escape(&failure_line(f, 160)));
        }
        h.push_str("</span></span></summary><div class=\"body\">");
        if let Some(first) = g.runs.first() {
            if !first.tags.is_empty() {
                w!(h, "<p class=\"muted\">tags: {}</p>", escape(&first.tags.join(", ")));
            }
        }
        for t in &g.runs {
            html_trial(h, t);
        }
        h.push_str("</div></details>");
    }
    h.push_str("</div>");
}

/// One self-contained HTML page: header, headline cards, SVG charts, the
/// tables by domain and language, and every dialogue with its trials'
/// failures and transcripts (in `<details>`).
pub fn html(r: &Report) -> String {
    let s = &r.summary;
    let k = max_k(r);
    let gs = groups(&r.results);
    let mut h = String::with_capacity(64 * 1024);

    h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    w!(h, "<title>Errand eval · {} · pass^1 {}</title>\n", escape(&r.model), pct(hat(&s.pass_hat, 0).unwrap_or(0.0)));
    w!(h, "<style>{CSS}</style>\n</head>\n<body>\n");

    // Header.
    w!(h, "<header><h1>Errand eval <span class=\"muted\">· {}</span></h1><dl class=\"meta\">", escape(&r.model));
    let paths = if r.paths.is_empty() { "-".to_string() } else { r.paths.iter().map(|p| format!("<code>{}</code>", escape(p))).collect::<Vec<_>>().join(" ") };
    let meta = [
        ("model", escape(&r.model)),
        ("server", escape(&r.server)),
        ("started", escape(&r.started)),
        ("trials", r.trials.to_string()),
        ("temperature", r.temperature.to_string()),
        ("wall time", escape(&duration(r.wall_s))),
        ("paths", paths),
        ("errand", escape(&r.errand_version)),
    ];
    for (key, value) in meta {
        w!(h, "<dt>{key}</dt><dd>{value}</dd>");
    }
    h.push_str("</dl></header>\n");

    // Headline cards.
    h.push_str("<section class=\"cards\">");
    for i in 0..k {
        let p = hat(&s.pass_hat, i);
        card(&mut h, &format!("pass^{}", i + 1), &p.map_or_else(|| "-".to_string(), pct), p.map(tint));
    }
    card(&mut h, "runs", &s.runs.to_string(), None);
    let passed = if s.runs > 0 { format!("{} ({})", s.passed_runs, pct(s.passed_runs as f64 / s.runs as f64)) } else { "0".to_string() };
    card(&mut h, "passed runs", &passed, None);
    card(&mut h, "dialogues", &s.dialogues.to_string(), None);
    h.push_str("</section>\n");

    // Charts.
    h.push_str("<h2>Charts</h2><section class=\"charts\">");
    let labels: Vec<String> = s.by_domain.iter().map(|row| row.key.clone()).collect();
    let values: Vec<Vec<f64>> = s.by_domain.iter().map(|row| vec![hat(&row.pass_hat, 0).unwrap_or(0.0)]).collect();
    chart(&mut h, "pass^1 by domain", &hbars(&labels, &[("pass^1".to_string(), GREEN)], &values, 1.0, pct));

    let mut series = vec![("pass^1".to_string(), GREEN)];
    let mut which = vec![0];
    if k > 1 {
        series.push((format!("pass^{k}"), BLUE));
        which.push(k - 1);
    }
    let labels: Vec<String> = s.by_lang.iter().map(|row| row.key.clone()).collect();
    let values: Vec<Vec<f64>> = s.by_lang.iter().map(|row| which.iter().map(|&i| hat(&row.pass_hat, i).unwrap_or(0.0)).collect()).collect();
    let title = if k > 1 { format!("pass^1 and pass^{k} by language") } else { "pass^1 by language".to_string() };
    chart(&mut h, &title, &hbars(&labels, &series, &values, 1.0, pct));

    let codes = sorted_codes(r);
    let labels: Vec<String> = codes.iter().map(|(c, _)| c.as_str().to_string()).collect();
    let values: Vec<Vec<f64>> = codes.iter().map(|&(_, n)| vec![n as f64]).collect();
    let top = codes.iter().map(|&(_, n)| n).max().unwrap_or(0) as f64;
    let svg = if codes.is_empty() { no_data() } else { hbars(&labels, &[("runs".to_string(), RED)], &values, top, count) };
    chart(&mut h, "reason codes (runs that had them)", &svg);

    let turn_s: Vec<f64> = s.latency.samples.iter().map(|&(_, t)| t / 1000.0).collect();
    let ttft_s: Vec<f64> = s.latency.samples.iter().filter_map(|&(f, _)| f.map(|v| v / 1000.0)).collect();
    chart(&mut h, &format!("turn latency ({} turn{})", turn_s.len(), plural(turn_s.len())), &histogram(&turn_s, BLUE, "turns"));
    chart(&mut h, &format!("time to first token ({} turn{})", ttft_s.len(), plural(ttft_s.len())), &histogram(&ttft_s, AMBER, "turns"));
    h.push_str("</section>\n");

    let l = &s.latency;
    w!(
        h,
        "<p class=\"stats\">TTFT p50 <b>{}</b> · p90 <b>{}</b> &nbsp;|&nbsp; turn p50 <b>{}</b> · p90 <b>{}</b> · max <b>{}</b> \
         &nbsp;|&nbsp; tokens: prompt <b>{}</b> · cached <b>{}</b> · completion <b>{}</b></p>\n",
        secs_unit(l.ttft_p50_ms),
        secs_unit(l.ttft_p90_ms),
        secs_unit(l.turn_p50_ms),
        secs_unit(l.turn_p90_ms),
        secs_unit(l.turn_max_ms),
        digits(s.tokens.prompt),
        digits(s.tokens.cached),
        digits(s.tokens.completion)
    );

    // Tables.
    h.push_str("<h2>By domain</h2>");
    html_rows(&mut h, "domain", &s.by_domain, k);
    h.push_str("\n<h2>By language</h2>");
    html_rows(&mut h, "lang", &s.by_lang, k);

    // Dialogues.
    w!(h, "\n<h2>Dialogues ({})</h2>\n<section>", gs.len());
    html_dialogues(&mut h, &gs);
    h.push_str("</section>\n");

    w!(
        h,
        "<footer>pass^k: the chance that k runs of a dialogue all pass, averaged over dialogues. \
         Turns count from 0 (t0 is the first). {}</footer>\n</body>\n</html>\n",
        escape(&headline(r))
    );
    h
}

#[cfg(test)]
mod tests {
    use super::super::report::summarize;
    use super::super::score::{Call, Confirmation, Transcript};
    use super::*;
    use serde_json::json;

    const EVIL: &str = "<script>alert(1)</script>";

    fn turn(action: &str, said: &str, ttft: f64, latency: f64) -> TurnRecord {
        TurnRecord {
            action: action.into(),
            input_id: Some("m1".into()),
            said: said.into(),
            ttft_ms: Some(ttft),
            latency_ms: latency,
            prompt_tokens: 1200,
            cached_tokens: 800,
            completion_tokens: 40,
            ..Default::default()
        }
    }

    fn trial(id: &str, n: usize, lang: &str, domain: &str, failures: Vec<Failure>, turns: Vec<TurnRecord>) -> TrialResult {
        TrialResult {
            id: id.into(),
            trial: n,
            lang: lang.into(),
            domain: domain.into(),
            tags: vec![domain.into()],
            simulated: false,
            passed: failures.is_empty(),
            failures,
            wall_ms: 4200.0,
            sim_end: None,
            transcript: Transcript { turns, ..Default::default() },
        }
    }

    fn report() -> Report {
        let mut order = turn("user: Order kung pao chicken", "Ordering from Chuan Wei Xuan.", 350.0, 2100.0);
        order.calls.push(Call { tool: "food_order".into(), arguments: json!({"restaurant_id": "sh01", "note": "<b>extra spicy</b> & 'hot'"}) });
        order.confirmations.push(Confirmation { token: "c1".into(), tool: "food_order".into(), amount: 4300, currency: "CNY".into(), summary: "Kung pao chicken".into() });
        let no_call = || vec![Failure::new(Code::NoCall, Some(1), "expected a call to ride_request; none was made")];
        let xss = || vec![Failure::new(Code::MustNotSay, Some(0), format!("said \"alert\": {EVIL}"))];
        let results = vec![
            trial("food-sichuan-en", 1, "en", "food", vec![], vec![order.clone(), turn("confirm", "Paid.", 200.0, 900.0)]),
            trial("food-sichuan-en", 2, "en", "food", vec![], vec![order, turn("confirm", "Paid.", 250.0, 1100.0)]),
            trial("ride-hongqiao-zh", 1, "zh", "ride", no_call(), vec![turn("user: 去虹桥站", "好的", 500.0, 3000.0), turn("user: 舒适型", "请问出发时间？", 650.0, 7000.0)]),
            trial("ride-hongqiao-zh", 2, "zh", "ride", vec![], vec![turn("user: 去虹桥站", "好的", 480.0, 2500.0)]),
            trial("chat-xss-ko", 1, "ko", "chat", xss(), vec![turn("user: hi", EVIL, 300.0, 1500.0)]),
            trial("chat-xss-ko", 2, "ko", "chat", xss(), vec![turn("user: hi", EVIL, 310.0, 1600.0)]),
        ];
        let summary = summarize(&results, 2);
        Report {
            errand_version: "0.1.0".into(),
            model: "qwen2.5-3b-instruct-q4".into(),
            server: "ws://127.0.0.1:8080/v1/ws".into(),
            started: "2025-06-01T10:00:00Z".into(),
            wall_s: 61.5,
            trials: 2,
            temperature: 0.7,
            paths: vec!["evals/dialogues".into()],
            summary,
            results,
        }
    }

    #[test]
    fn terminal_lists_dialogues_tables_codes_and_the_headline() {
        let r = report();
        let t = terminal(&r);
        for id in ["food-sichuan-en", "ride-hongqiao-zh", "chat-xss-ko"] {
            assert!(t.contains(id), "{id} missing:\n{t}");
        }
        assert!(t.contains("pass^1 "), "{t}");
        assert!(t.contains("pass^2 "), "{t}");
        assert!(t.contains("no_call"), "{t}");
        assert!(t.contains("must_not_say"), "{t}");
        assert!(t.contains("t1 expected a call to ride_request"), "{t}");
        assert!(t.contains("by domain") && t.contains("by language"), "{t}");
        assert!(t.contains("3 dialogues × 2 trials, 6 runs"), "{t}");
        assert!(!t.contains('\u{1b}'), "no ANSI escapes");
        // The dialogue lines are aligned: each id starts in the same column.
        let cols: Vec<usize> = t.lines().filter_map(|l| ["food-sichuan-en", "ride-hongqiao-zh", "chat-xss-ko"].iter().find_map(|id| l.find(id))).collect();
        assert_eq!(cols.len(), 3);
        assert!(cols.iter().all(|&c| c == cols[0]), "{t}");
    }

    #[test]
    fn html_is_self_contained_and_escaped() {
        let r = report();
        let h = html(&r);
        assert!(h.starts_with("<!DOCTYPE html>"));
        assert!(h.contains("<svg"));
        assert!(!h.contains("<script"), "no scripts at all");
        assert!(!h.contains("http://") && !h.contains("https://"));
        assert!(!h.contains(EVIL));
        assert!(h.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!h.contains("<b>extra spicy</b>"));
        assert!(h.contains("&lt;b&gt;extra spicy&lt;/b&gt; &amp; &#39;hot&#39;"));
        assert!(h.contains("<details"));
        assert!(h.contains("4300 CNY"));
        for id in ["food-sichuan-en", "ride-hongqiao-zh", "chat-xss-ko"] {
            assert!(h.contains(id));
        }
        assert!(h.trim_end().ends_with("</html>"));
    }

    #[test]
    fn an_empty_report_renders() {
        let summary = summarize(&[], 1);
        let r = Report {
            errand_version: "0.1.0".into(),
            model: "m".into(),
            server: "local".into(),
            started: "now".into(),
            wall_s: 0.0,
            trials: 1,
            temperature: 0.0,
            paths: vec![],
            summary,
            results: vec![],
        };
        assert!(terminal(&r).contains("pass^1 0.0%"));
        let h = html(&r);
        assert!(h.contains("no data") && h.contains("<svg"));
    }

    #[test]
    fn helpers() {
        assert_eq!(escape(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
        assert_eq!(pad_right("虹桥", 4), "虹桥  ");
        assert_eq!(pad_left("虹桥", 4), "  虹桥");
        assert_eq!(clip("一二三四五六", 4), "一二三…");
        assert_eq!(clip("a\n  b", 10), "a b");
        assert_eq!(digits(1234567), "1,234,567");
        assert_eq!(digits(999), "999");
        for (raw, want) in [(0.73, 1.0), (1.3, 2.0), (0.21, 0.25), (40.0, 50.0), (0.0, 0.1)] {
            assert!((nice_step(raw) - want).abs() < 1e-9, "{raw}");
        }
        assert_eq!(short_num(0.30000000000000004), "0.3");
        assert_eq!(short_num(2.0), "2");
        let (step, counts) = buckets(&[0.0, 1.0, 9.99, 10.0]);
        assert!((step - 1.0).abs() < 1e-9);
        assert_eq!(counts.len(), 10);
        assert_eq!(counts.iter().sum::<usize>(), 4);
        assert_eq!(counts[9], 2);
        let (_, counts) = buckets(&[0.0, 0.0]);
        assert_eq!(counts, vec![2]);
    }
}
