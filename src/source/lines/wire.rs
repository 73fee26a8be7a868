//! The rules of a [`LineRules`] as text, so that a coordinator's `bad_rows` options reach the
//! workers that read its tables (one ASCII line: hex of JSON, fit for a gRPC header).

use object_store::path::Path as ObjPath;
use serde_json::{Value, json};

use super::{BadRows, LineFormat, LineRules, Rule};

impl LineRules {
    /// Every rule, as one line of hex digits.
    pub fn to_text(&self) -> String {
        let Ok(rules) = self.rules.read() else {
            return String::new();
        };
        let all: Vec<Value> = rules
            .iter()
            .map(|r| {
                let format = match r.format {
                    LineFormat::Json => json!("json"),
                    LineFormat::Csv { delimiter, quote } => json!([delimiter, quote]),
                };
                json!([r.root, r.prefix.as_ref(), r.mode.as_str(), format])
            })
            .collect();
        Value::Array(all)
            .to_string()
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Adds the rules of `text` ([`LineRules::to_text`]) to these, replacing those for the same
    /// places. Text that does not decode adds nothing.
    pub fn add_from_text(&self, text: &str) {
        for rule in parse(text).unwrap_or_default() {
            self.set(&rule.root, rule.prefix, rule.mode, rule.format);
        }
    }
}

fn parse(text: &str) -> Option<Vec<Rule>> {
    if text.is_empty() || !text.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect();
    let all: Vec<Value> = serde_json::from_slice(&bytes?).ok()?;
    all.iter()
        .map(|r| {
            let format = match &r[3] {
                Value::String(s) if s == "json" => LineFormat::Json,
                Value::Array(dq) => LineFormat::Csv {
                    delimiter: u8::try_from(dq.first()?.as_u64()?).ok()?,
                    quote: u8::try_from(dq.get(1)?.as_u64()?).ok()?,
                },
                _ => return None,
            };
            Some(Rule {
                root: r[0].as_str()?.to_string(),
                prefix: ObjPath::parse(r[1].as_str()?).ok()?,
                mode: BadRows::parse(r[2].as_str()?)?,
                format,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_round_trip_and_bad_text_adds_nothing() {
        let a = LineRules::default();
        a.set(
            "file://",
            ObjPath::from("data/t"),
            BadRows::Skip,
            LineFormat::Json,
        );
        let csv = LineFormat::Csv {
            delimiter: b';',
            quote: b'"',
        };
        a.set("s3://bucket", ObjPath::from("x y/é"), BadRows::Null, csv);
        let text = a.to_text();
        assert!(text.bytes().all(|b| b.is_ascii_hexdigit()));
        let b = LineRules::default();
        b.add_from_text(&text);
        assert_eq!(b.to_text(), text);
        assert_eq!(
            b.rule_for("file://", &ObjPath::from("data/t/1.jsonl")),
            (BadRows::Skip, LineFormat::Json)
        );
        assert_eq!(
            b.rule_for("s3://bucket", &ObjPath::from("x y/é/1.csv")),
            (BadRows::Null, csv)
        );
        for bad in ["", "zz", "123", "7b7d"] {
            let c = LineRules::default();
            c.add_from_text(bad);
            assert_eq!(c.to_text(), "5b5d", "{bad}");
        }
    }
}
