//! Figures, per-scenario summaries and the final table.

use std::fmt::Write as _;
use std::time::Duration;

/// A set of durations with the percentiles the reports quote.
#[derive(Clone, Debug, Default)]
pub struct Latencies(Vec<Duration>);

impl Latencies {
    pub fn new(mut values: Vec<Duration>) -> Self {
        values.sort();
        Self(values)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Nearest-rank percentile; `None` when there are no values.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        if self.0.is_empty() {
            return None;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        Some(self.0[rank.clamp(1, self.0.len()) - 1])
    }

    pub fn max(&self) -> Option<Duration> {
        self.0.last().copied()
    }

    /// `p50 1.2s p99 4.8s max 4.9s (n=60)` or `none`.
    pub fn summary(&self) -> String {
        match (self.percentile(50.0), self.percentile(99.0), self.max()) {
            (Some(p50), Some(p99), Some(max)) => format!(
                "p50 {} p99 {} max {} (n={})",
                short(p50),
                short(p99),
                short(max),
                self.0.len()
            ),
            _ => "none".into(),
        }
    }
}

/// `850ms` below a second, `4.21s` above.
pub fn short(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.2}s", d.as_secs_f64())
    }
}

/// The outcome of one scenario on one target.
#[derive(Debug, Default)]
pub struct ScenarioReport {
    pub name: &'static str,
    pub agents: usize,
    pub reconnects: Latencies,
    pub requests: u64,
    pub failed_requests: u64,
    pub commands: u64,
    pub lost_commands: u64,
    pub duration: Duration,
    /// Scenario-specific figures, in order: ("cut after", "3.02s").
    pub figures: Vec<(String, String)>,
    /// Every failed check, in words; empty means the scenario passed.
    pub failures: Vec<String>,
}

impl ScenarioReport {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            ..Self::default()
        }
    }

    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// Records a check; a false condition becomes a failure with `what` as its text.
    pub fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.failures.push(what.into());
        }
    }

    pub fn figure(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.figures.push((name.into(), value.into()));
    }

    /// The line printed when the scenario ends.
    pub fn summary_line(&self) -> String {
        let mut line = format!(
            "{} {}: agents {}, reconnect {}, failed requests {}/{}, lost commands {}/{}",
            if self.passed() { "PASS" } else { "FAIL" },
            self.name,
            self.agents,
            self.reconnects.summary(),
            self.failed_requests,
            self.requests,
            self.lost_commands,
            self.commands,
        );
        for (name, value) in &self.figures {
            let _ = write!(line, ", {name} {value}");
        }
        let _ = write!(line, " [{}]", short(self.duration));
        line
    }
}

/// The table that ends a run.
pub fn table(target: &str, reports: &[ScenarioReport]) -> String {
    let header = [
        "scenario",
        "result",
        "agents",
        "reconnect p50",
        "p99",
        "max",
        "failed req",
        "lost cmd",
        "time",
    ];
    let rows: Vec<[String; 9]> = reports
        .iter()
        .map(|r| {
            let pct = |p: f64| r.reconnects.percentile(p).map_or("-".into(), short);
            [
                r.name.to_string(),
                if r.passed() { "PASS" } else { "FAIL" }.to_string(),
                r.agents.to_string(),
                pct(50.0),
                pct(99.0),
                r.reconnects.max().map_or("-".into(), short),
                format!("{}/{}", r.failed_requests, r.requests),
                format!("{}/{}", r.lost_commands, r.commands),
                short(r.duration),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::from("|");
        for (cell, w) in cells.iter().zip(widths) {
            let _ = write!(s, " {cell:<w$} |");
        }
        s
    };
    let mut out = format!("\nend-to-end results ({target} target)\n");
    out.push_str(&line(&header.map(String::from)));
    out.push('\n');
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&line(&rule).replace(' ', "-"));
    out.push('\n');
    for row in &rows {
        out.push_str(&line(row));
        out.push('\n');
    }
    for r in reports.iter().filter(|r| !r.passed()) {
        let _ = writeln!(out, "\n{} failed:", r.name);
        for f in &r.failures {
            let _ = writeln!(out, "  - {f}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let l = Latencies::new((1..=100).map(Duration::from_millis).collect());
        assert_eq!(l.percentile(50.0), Some(Duration::from_millis(50)));
        assert_eq!(l.percentile(99.0), Some(Duration::from_millis(99)));
        assert_eq!(l.max(), Some(Duration::from_millis(100)));
        let one = Latencies::new(vec![Duration::from_secs(2)]);
        assert_eq!(one.percentile(1.0), Some(Duration::from_secs(2)));
        assert!(Latencies::default().percentile(50.0).is_none());
    }

    #[test]
    fn a_failed_check_fails_the_scenario() {
        let mut r = ScenarioReport::new("x");
        r.check(true, "fine");
        assert!(r.passed());
        r.check(false, "lost 1 command");
        assert!(!r.passed());
        assert!(r.summary_line().starts_with("FAIL x:"));
    }
}
