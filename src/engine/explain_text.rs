//! `sluice explain`'s text: each statement with its plan and calls, then a table per function
//! and what the figures mean.

use super::explain::{Explanation, FunctionEstimate};

impl Explanation {
    /// The estimate as text: each statement with its plan and calls, then a table per function.
    pub fn to_text(&self, with_plans: bool) -> String {
        let mut s = String::new();
        for st in &self.statements {
            s.push_str(&format!(
                "Statement {} (line {}): {}\n",
                st.index, st.line, st.summary
            ));
            if let Some(note) = &st.note {
                s.push_str(&format!("  note: {note}\n"));
            }
            if with_plans && let Some(plan) = &st.plan {
                for line in plan.lines() {
                    s.push_str(&format!("  | {line}\n"));
                }
            }
            if with_plans && let Some(stages) = &st.stages {
                for line in stages.lines() {
                    s.push_str(&format!("  : {line}\n"));
                }
            }
            if let Some(rows) = st.rows {
                s.push_str(&format!("  rows: {}\n", thousands(rows)));
            }
            for f in &st.functions {
                s.push_str(&calls_line(f));
            }
        }
        s.push('\n');
        s.push_str(&table(&self.totals, &self.total()));
        for f in self.totals.iter().filter(|f| f.batch_files.is_some()) {
            let usd = |c: Option<f64>| c.map_or("-".into(), |c| format!("{c:.4} USD"));
            s.push_str(&format!(
                "{} runs as batches on model {}: {} at batch prices, {} live\n",
                f.function,
                f.model,
                usd(f.cost_usd),
                usd(f.live_cost_usd)
            ));
        }
        for (model, how) in &self.tokenizers {
            s.push_str(&format!("tokens of model {model}: {how}\n"));
        }
        match &self.extrapolated {
            Some(how) => s.push_str(&format!(
                "prompt tokens are counted exactly; completion tokens are extrapolated: {how}\n"
            )),
            None => s.push_str(
                "prompt tokens are counted exactly; completion tokens are estimated from each \
                 output schema (array lengths from minItems/maxItems, strings of about 80 \
                 characters)\n",
            ),
        }
        if self.totals.iter().any(|f| f.tokens_cached > 0) {
            s.push_str(
                "shared prefix: the prompt tokens that open as an earlier prompt of the same model \
                 does, which a server's prefix cache computes once (sluice sends them in that \
                 order) and which cost the cached input price\n",
            );
        }
        for model in &self.unpriced {
            s.push_str(&format!(
                "no prices for model {model}: set input_usd_per_mtok and output_usd_per_mtok in \
                 [models.{model}] of sluice.toml to see its cost\n"
            ));
        }
        s
    }
}

/// One function's calls in one statement.
fn calls_line(f: &FunctionEstimate) -> String {
    let mut s = format!(
        "  {}: {} calls, {} cached, {} requests",
        f.function,
        thousands(f.calls),
        thousands(f.cached),
        thousands(f.requests)
    );
    if let Some(n) = f.batch_files {
        s.push_str(&format!(" as a batch ({n} file(s) of model {})", f.model));
    }
    if let Some(rows) = f.rows_per_prompt.filter(|r| *r > 1) {
        let saved = (f.calls - f.cached).saturating_sub(f.requests);
        s.push_str(&format!(
            " ({rows} rows per prompt: {saved} requests saved)"
        ));
    }
    s.push('\n');
    if !f.cascade.is_empty() {
        s.push_str(&super::cascade_estimate::line(&f.cascade));
    }
    s
}

fn table(rows: &[FunctionEstimate], total: &FunctionEstimate) -> String {
    let header = [
        "function",
        "model",
        "calls",
        "cached",
        "requests",
        "tokens in",
        "shared prefix",
        "tokens out (est.)",
        "cost USD",
    ];
    let cells = |f: &FunctionEstimate| {
        vec![
            f.function.clone(),
            f.model.clone(),
            thousands(f.calls),
            thousands(f.cached),
            thousands(f.requests),
            thousands(f.tokens_in),
            share(f.tokens_cached, f.tokens_in),
            thousands(f.tokens_out),
            f.cost_usd.map_or("-".into(), |c| format!("{c:.4}")),
        ]
    };
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    lines.extend(rows.iter().map(cells));
    let mut t = cells(total);
    t[0] = "total".into();
    t[1] = String::new();
    lines.push(t);
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for l in &lines {
        let row: Vec<String> = l
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i < 2 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(row.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `part` of `whole` as a percentage, `-` when `whole` is 0.
fn share(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".into();
    }
    format!("{:.0}%", part as f64 * 100.0 / whole as f64)
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
