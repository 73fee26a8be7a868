//! The run's summary: one line per fact of its LLM calls, then one per model that refused in
//! bursts and one per function.

use crate::llm::MetricsSnapshot;

/// One line per fact of the run's LLM calls.
pub fn format_summary(m: &MetricsSnapshot) -> String {
    let join = |map: &std::collections::BTreeMap<String, u64>| {
        map.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let retries: u64 = m.retries.values().sum();
    let mut s = format!(
        "LLM: {} calls ({} succeeded, {} failed), {} requests, {} retries",
        m.calls, m.succeeded, m.failed, m.requests, retries
    );
    if retries > 0 {
        s.push_str(&format!(" ({})", join(&m.retries)));
    }
    if m.cache_hits + m.cache_misses > 0 {
        s.push_str(&format!(
            ", cache {} hits / {} misses",
            m.cache_hits, m.cache_misses
        ));
    }
    if m.deduplicated > 0 {
        s.push_str(&format!(", {} shared by identical calls", m.deduplicated));
    }
    if m.failed > 0 {
        s.push_str(&format!("; errors: {}", join(&m.errors)));
    }
    s.push_str(&format!(
        "; {}; peak {} in flight",
        tokens(m.tokens_in, m.tokens_cached, m.tokens_out),
        m.max_in_flight
    ));
    if m.cost_usd > 0.0 {
        s.push_str(&format!("; cost ${:.4}", m.cost_usd));
    }
    if m.hedges > 0 {
        s.push_str(&format!("; {} hedged", m.hedges));
    }
    for (name, g) in m.models.iter().filter(|(_, g)| g.saturations > 0) {
        s.push_str(&format!(
            "\n  model {name}: the provider refused in bursts {} time(s)",
            g.saturations
        ));
        if let Some(kind) = g.kind {
            s.push_str(&format!(", a {kind} learned"));
        }
        s.push_str(&format!("; settled at {} in flight", g.limit));
        if let Some(p) = g.pace_rps {
            s.push_str(&format!(", {p:.1} requests/s"));
        }
    }
    for (name, rs) in &m.replicas {
        for (i, r) in rs.iter().enumerate() {
            s.push_str(&format!(
                "\n  model {name} replica {i} ({}): {} requests, {} failed, ejected {} time(s), {}",
                r.url, r.requests, r.failures, r.ejections, r.state
            ));
        }
    }
    for (name, f) in &m.functions {
        s.push_str(&function_line(name, f));
    }
    s
}

/// One function's line (and its cascade's, with one).
fn function_line(name: &str, f: &crate::llm::dispatch::FunctionSnapshot) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "\n  {name}: {} prompts, {} requests, {} cache hits, {} failed",
        f.prompts, f.requests, f.cache_hits, f.failed
    ));
    let lat = &f.latency_ms;
    if let (Some(p50), Some(p95), Some(p99)) = (lat.p50, lat.p95, lat.p99) {
        s.push_str(&format!(
            "; latency p50 {p50:.1} ms, p95 {p95:.1} ms, p99 {p99:.1} ms"
        ));
    }
    s.push_str(&format!(
        "; {}; peak {} in flight",
        tokens(f.tokens_in, f.tokens_cached, f.tokens_out),
        f.max_in_flight
    ));
    if !f.cascade.is_empty() {
        s.push_str(&cascade_line(f));
    }
    s
}

/// `    cascade: small answered 1,700 of 2,000 rows, large 300 of 300; cost $0.0123, $0.0456
/// saved against large alone`.
fn cascade_line(f: &crate::llm::dispatch::FunctionSnapshot) -> String {
    let models: Vec<String> = f
        .cascade
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let answered = if i == 0 { " answered" } else { "" };
            format!(
                "{}{answered} {} of {} rows",
                c.model,
                thousands(c.answered),
                thousands(c.asked)
            )
        })
        .collect();
    let mut s = format!("\n    cascade: {}", models.join(", "));
    if let (Some((alone, spent)), Some(last)) = (f.cascade_costs(), f.cascade.last()) {
        s.push_str(&format!(
            "; cost ${spent:.4}, ${:.4} saved against {} alone",
            alone - spent,
            last.model
        ));
    }
    s
}

/// `tokens 12,000 in (8,000 cached) / 900 out`; the cached part only when there is one.
fn tokens(input: u64, cached: u64, output: u64) -> String {
    let cached = match cached {
        0 => String::new(),
        c => format!(" ({} cached)", thousands(c)),
    };
    format!(
        "tokens {} in{cached} / {} out",
        thousands(input),
        thousands(output)
    )
}

/// `12345678` as `12,345,678`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_cached_tokens_only_when_there_are_some() {
        assert_eq!(
            tokens(12_000, 8_000, 900),
            "tokens 12,000 in (8,000 cached) / 900 out"
        );
        assert_eq!(tokens(120, 0, 9), "tokens 120 in / 9 out");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(0), "0");
    }
}
