//! Markdown tables and an SVG chart from a set of run results.

use std::fmt::Write as _;

use crate::{Bound, SimResult};

/// Recomputes a stored result's time bound with [`Bound::all_wired`] (results written by an
/// earlier build summed the bucket time and one write's time instead).
pub fn normalize(r: &mut SimResult) {
    if r.scenario == "churn" {
        return;
    }
    if r.policy.starts_with("cluster") {
        // Results written before the allocator's reads per write were counted as two.
        let scenario = if r.scenario == "cold" {
            crate::Scenario::Cold
        } else {
            crate::Scenario::ScaleOut
        };
        let (_, reads) = Bound::needs(scenario, crate::Policy::Cluster, r.nodes as u64);
        let bucket = &r.settings["limits"]["reads"];
        let size = bucket["size"].as_f64().unwrap_or(250.0);
        let refill = bucket["refill_per_sec"].as_f64().unwrap_or(25.0);
        r.bound.reads = reads;
        r.bound.reads_s = (reads as f64 - size).max(0.0) / refill;
    }
    let b = &mut r.bound;
    if b.one_write_s == 0.0 && b.writes > 0 {
        let put = r.settings["put_latency_ms"].as_f64().unwrap_or(1000.0) / 1000.0;
        let polls = r.settings["operation_retry_after_secs"]
            .as_f64()
            .unwrap_or(1.0);
        b.one_write_s = put + 2.0 * polls;
    }
    b.all_wired_s = Bound::all_wired(b.writes_s, b.reads_s, b.one_write_s);
}

fn md_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = format!("| {} |\n|", headers.join(" | "));
    for _ in headers {
        out.push_str("---|");
    }
    out.push('\n');
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

fn ratio(value: f64, reference: f64) -> String {
    if reference > 0.0 {
        format!("{:.2}x", value / reference)
    } else if value == 0.0 {
        "= min".into()
    } else {
        "min 0".into()
    }
}

/// How a run fares against the issue's targets (the naive comparison is in its own column).
pub fn targets(r: &SimResult) -> Vec<String> {
    let b = &r.bound;
    let mut missed = Vec::new();
    if r.wired < r.pods {
        missed.push(format!("{} pods never wired", r.pods - r.wired));
    }
    let writes_ok = if b.writes == 0 {
        r.writes == 0
    } else {
        r.writes as f64 <= 1.1 * b.writes as f64
    };
    if !writes_ok {
        missed.push("writes > 1.1x min".into());
    }
    if r.throttled_pct() >= 1.0 {
        missed.push("429s >= 1%".into());
    }
    if b.all_wired_s > 0.0 && r.all_wired_s > 1.2 * b.all_wired_s {
        missed.push("time > 1.2x bound".into());
    }
    missed
}

/// One table per scenario: a row per (N, policy).
pub fn tables(results: &[SimResult]) -> String {
    let mut out = String::new();
    let mut scenarios: Vec<&str> = results.iter().map(|r| r.scenario.as_str()).collect();
    scenarios.dedup();
    for scenario in ["cold", "scale_out", "churn"] {
        let mut rows: Vec<&SimResult> = results.iter().filter(|r| r.scenario == scenario).collect();
        if rows.is_empty() {
            continue;
        }
        rows.sort_by_key(|r| (r.nodes, r.policy.clone()));
        let _ = writeln!(out, "\n#### {scenario}\n");
        let table_rows: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                let naive = results.iter().find(|o| {
                    o.scenario == r.scenario && o.nodes == r.nodes && o.policy == "naive"
                });
                let vs_naive = match (r.policy.as_str(), naive) {
                    ("naive", _) => "-".to_string(),
                    (_, None) => "not run".to_string(),
                    (_, Some(n)) => better_than(r, n),
                };
                let missed = targets(r);
                vec![
                    r.nodes.to_string(),
                    r.policy.clone(),
                    format!("{}/{}", r.wired, r.pods),
                    format!(
                        "{} (min {}, {})",
                        r.writes,
                        r.bound.writes,
                        ratio(r.writes as f64, r.bound.writes as f64)
                    ),
                    format!("{} (min {})", r.reads, r.bound.reads),
                    format!("{} ({:.2}%)", r.throttled, r.throttled_pct()),
                    format!(
                        "{:.1} s (bound {:.1} s, {})",
                        r.all_wired_s,
                        r.bound.all_wired_s,
                        ratio(r.all_wired_s, r.bound.all_wired_s)
                    ),
                    format!("{:.1} / {:.1} s", r.wait_p50_s, r.wait_p99_s),
                    r.try_again.to_string(),
                    format!("{:.0} MiB", r.peak_rss_mib),
                    if r.cpu_s > 0.0 && r.all_wired_s > 0.0 {
                        format!("{:.2}", r.cpu_s / r.all_wired_s)
                    } else {
                        "-".into()
                    },
                    if missed.is_empty() {
                        "all met".into()
                    } else {
                        missed.join("; ")
                    },
                    vs_naive,
                ]
            })
            .collect();
        out += &md_table(
            &[
                "N",
                "policy",
                "pods wired",
                "NIC writes",
                "ARM reads",
                "429s (% of calls)",
                "all wired",
                "pod wait p50 / p99",
                "try-again answers",
                "peak RSS",
                "sim CPU (cores)",
                "targets",
                "vs naive",
            ],
            &table_rows,
        );
    }
    out
}

/// Which of writes, 429s, time to all wired and p50/p99 are better (lower) than naive's.
fn better_than(r: &SimResult, n: &SimResult) -> String {
    // Times within 5% (or 0.1 s) of naive's count as a tie: both carry the pods' random phases.
    let slower = |a: f64, b: f64| a > b + (0.05 * b).max(0.1);
    let figures = [
        ("writes", r.writes > n.writes),
        ("reads", r.reads > n.reads),
        ("429s", r.throttled > n.throttled),
        ("all wired", slower(r.all_wired_s, n.all_wired_s)),
        ("p50", slower(r.wait_p50_s, n.wait_p50_s)),
        ("p99", slower(r.wait_p99_s, n.wait_p99_s)),
        ("try-again", r.try_again > n.try_again),
    ];
    let worse: Vec<&str> = figures
        .iter()
        .filter(|(_, worse)| *worse)
        .map(|(name, _)| *name)
        .collect();
    if worse.is_empty() {
        "no figure worse".into()
    } else {
        format!("worse: {}", worse.join(", "))
    }
}

/// Small multiples: for each (scenario, N) the share of pods wired over time, one line per
/// policy, and the budget bound as a dashed line.
pub fn svg(results: &[SimResult]) -> String {
    let mut panels: Vec<(String, usize)> = results
        .iter()
        .map(|r| (r.scenario.clone(), r.nodes))
        .collect();
    panels.sort_by_key(|(s, n)| {
        (
            ["cold", "scale_out", "churn"].iter().position(|x| x == s),
            *n,
        )
    });
    panels.dedup();
    let (pw, ph, pad) = (360.0, 220.0, 50.0);
    let cols = 3usize;
    let rows = panels.len().div_ceil(cols).max(1);
    let width = cols as f64 * (pw + pad) + pad;
    let height = rows as f64 * (ph + pad + 20.0) + 60.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/><text x="{pad}" y="24" font-size="15">Cluster simulation: share of pods wired over time (s); blue vnet-agent, red naive, green cluster allocator (purple: its prefix mode), dashed = budget bound of the first run</text>"#
    );
    for (i, (scenario, nodes)) in panels.iter().enumerate() {
        let x0 = pad + (i % cols) as f64 * (pw + pad);
        let y0 = 50.0 + (i / cols) as f64 * (ph + pad + 20.0);
        let runs: Vec<&SimResult> = results
            .iter()
            .filter(|r| &r.scenario == scenario && r.nodes == *nodes)
            .collect();
        let bound = runs.first().map_or(0.0, |r| r.bound.all_wired_s);
        let tmax = runs
            .iter()
            .filter_map(|r| r.wired_at_s.last().copied())
            .fold(bound, f64::max)
            .max(1.0)
            * 1.05;
        let _ = write!(
            s,
            r##"<g><text x="{x0}" y="{}" font-size="13">{scenario}, N = {nodes}</text><rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/><text x="{x0}" y="{}">0</text><text x="{}" y="{}" text-anchor="end">{tmax:.0} s</text><text x="{}" y="{}" text-anchor="end">100%</text>"##,
            y0 - 6.0,
            y0 + ph + 14.0,
            x0 + pw,
            y0 + ph + 14.0,
            x0 - 4.0,
            y0 + 10.0
        );
        if bound > 0.0 {
            let bx = x0 + pw * bound / tmax;
            let _ = write!(
                s,
                r##"<line x1="{bx:.1}" y1="{y0}" x2="{bx:.1}" y2="{}" stroke="#333" stroke-dasharray="4 3"/>"##,
                y0 + ph
            );
        }
        for r in runs {
            let color = match r.policy.as_str() {
                "naive" => "#c0392b",
                "cluster" => "#1e8449",
                "cluster-prefix" => "#7d3c98",
                _ => "#1f5fbf",
            };
            let total = r.pods.max(1) as f64;
            let n = r.wired_at_s.len();
            let step = (n / 400).max(1);
            let mut points = format!("{x0:.1},{:.1}", y0 + ph);
            for (k, t) in r.wired_at_s.iter().enumerate().step_by(step) {
                let x = x0 + pw * t / tmax;
                let y = y0 + ph - ph * (k + 1) as f64 / total;
                let _ = write!(points, " {x:.1},{y:.1}");
            }
            if let Some(t) = r.wired_at_s.last() {
                let _ = write!(
                    points,
                    " {:.1},{:.1}",
                    x0 + pw * t / tmax,
                    y0 + ph - ph * n as f64 / total
                );
            }
            let _ = write!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{points}"/>"#
            );
        }
        s.push_str("</g>");
    }
    s.push_str("</svg>\n");
    s
}
