//! The models of a function's cascade as its TOML names them (`cascade = [{ model = "small",
//! min_confidence = 0.9 }, { model = "large" }]`), checked when the function is loaded.

use serde::Deserialize;

use super::kind::KindName;

/// One model of a cascade as serde reads it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStage {
    model: String,
    min_confidence: Option<f64>,
}

/// One model of a function's cascade (`cascade = [{ model = "small", min_confidence = 0.9 },
/// { model = "large" }]`): every row goes to the first model; a row whose answer's confidence
/// is below the model's `min_confidence` (or that fails) goes on to the next.
#[derive(Debug, Clone, PartialEq)]
pub struct CascadeStage {
    /// The model's name in sluice.toml.
    pub model: String,
    /// The least confidence of an answer this model gives; none for the last model, which
    /// answers every row it is asked.
    pub min_confidence: Option<f64>,
}

/// The models of a `cascade` (`model_given`: the function also names a `model`), checked: two or more, instead of `model`, each but the last with a
/// `min_confidence` in (0, 1], the last without; not for embeddings and aggregates, whose
/// answers have no confidence.
pub(super) fn check(
    stages: Option<&[RawStage]>,
    model_given: bool,
    kind: KindName,
) -> Result<Vec<CascadeStage>, String> {
    let Some(stages) = stages else {
        return Ok(Vec::new());
    };
    if model_given {
        return Err("give either model or cascade, not both".into());
    }
    match kind {
        KindName::Embedding => {
            return Err(
                "an embedding has no confidence to pass rows on by; leave cascade out \
                        (kind = \"embedding\")"
                    .into(),
            );
        }
        KindName::Aggregate => {
            return Err(
                "an aggregate's answer has no confidence to pass groups on by; leave \
                        cascade out (kind = \"aggregate\")"
                    .into(),
            );
        }
        KindName::Completion => {}
    }
    if stages.len() < 2 {
        return Err(
            "a cascade names two or more models, e.g. cascade = [{ model = \"small\", \
                    min_confidence = 0.9 }, { model = \"large\" }]"
                .into(),
        );
    }
    let last = stages.len() - 1;
    let mut out = Vec::with_capacity(stages.len());
    for (i, s) in stages.iter().enumerate() {
        match (i == last, s.min_confidence) {
            (false, None) => {
                return Err(format!(
                    "cascade model {:?} needs min_confidence (0 < c <= 1): below it, a row goes \
                     on to the next model",
                    s.model
                ));
            }
            (false, Some(c)) if !(c > 0.0 && c <= 1.0) => {
                return Err(format!(
                    "cascade model {:?}: min_confidence {c} is outside (0, 1]",
                    s.model
                ));
            }
            (true, Some(_)) => {
                return Err(format!(
                    "the last model of a cascade ({:?}) answers every row it is asked; leave its \
                     min_confidence out",
                    s.model
                ));
            }
            _ => {}
        }
        if out.iter().any(|o: &CascadeStage| o.model == s.model) {
            return Err(format!("model {:?} is listed twice in cascade", s.model));
        }
        out.push(CascadeStage {
            model: s.model.clone(),
            min_confidence: s.min_confidence,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn a_cascade_is_checked_when_loaded() {
        let base = "name = \"f\"\nargs = [\"x\"]\nprompt = \"{{ x }}\"\n";
        let parse = |extra: &str| {
            crate::udf::def::FunctionDef::parse(&format!("{base}{extra}"), Path::new("f.toml"))
        };
        let ok =
            parse("cascade = [{ model = \"small\", min_confidence = 0.9 }, { model = \"large\" }]")
                .unwrap();
        assert_eq!(ok.model, "small");
        assert_eq!(ok.cascade.len(), 2);
        assert_eq!(ok.cascade[0].min_confidence, Some(0.9));
        assert_eq!(ok.cascade[1].model, "large");
        let err = |extra: &str| parse(extra).unwrap_err().to_string();
        for (extra, says) in [
            ("cascade = [{ model = \"large\" }]", "two or more"),
            (
                "cascade = [{ model = \"a\" }, { model = \"b\" }]",
                "needs min_confidence",
            ),
            (
                "cascade = [{ model = \"a\", min_confidence = 1.5 }, { model = \"b\" }]",
                "outside (0, 1]",
            ),
            (
                "cascade = [{ model = \"a\", min_confidence = 0.5 }, { model = \"b\", \
                 min_confidence = 0.5 }]",
                "leave its min_confidence out",
            ),
            (
                "model = \"a\"\ncascade = [{ model = \"a\", min_confidence = 0.5 }, { model = \"b\" }]",
                "either model or cascade",
            ),
            (
                "cascade = [{ model = \"a\", min_confidence = 0.5 }, { model = \"a\" }]",
                "listed twice",
            ),
            (
                "kind = \"embedding\"\ndim = 4\ncascade = [{ model = \"a\", min_confidence = 0.5 }, \
                 { model = \"b\" }]",
                "no confidence",
            ),
            (
                "cascade = [{ model = \"a\", threshold = 0.5 }, { model = \"b\" }]",
                "threshold",
            ),
        ] {
            let e = err(extra);
            assert!(e.contains(says), "{extra}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
