//! LLM function definitions: `udfs/*.toml` → [`FunctionDef`], with templates compiled and checked
//! at load time.
//!
//! ```toml
//! name = "generate_questions"
//! args = ["ticker", "quarter", "date", "passage"]
//! model = "default"
//! max_tokens = 200
//! temperature = 0.0
//! system = "You are a financial analyst."
//! prompt = "Ask three questions about {{ passage }}"
//! output = { type = "array", items = { type = "string" }, minItems = 3, maxItems = 3 }
//! on_error = "null"   # or "fail"
//! ```

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use minijinja::{Environment, UndefinedBehavior, Value as JinjaValue};
use serde::Deserialize;

pub use super::kind::FunctionKind;
use crate::types::{OutputSchema, RenderedPrompt};

/// What happens to a row whose call fails after all retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// The value is NULL and `<name>_error(...)` describes the failure (default).
    #[default]
    Null,
    /// The whole statement fails.
    Fail,
}

/// Errors found while loading function definitions.
#[derive(Debug, thiserror::Error)]
pub enum DefError {
    /// The file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// What failed.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Anything wrong with one definition; the message names the file and the key.
    #[error("{path}: {message}")]
    Invalid {
        /// The definition file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDef {
    name: String,
    description: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    model: Option<String>,
    system: Option<String>,
    prompt: String,
    max_tokens: Option<u32>,
    temperature: Option<f64>,
    output: Option<toml::Value>,
    #[serde(default)]
    on_error: OnError,
    rows_per_prompt: Option<usize>,
    item: Option<String>,
    #[serde(default)]
    kind: FunctionKind,
    dim: Option<usize>,
    reduce: Option<String>,
    max_input_tokens: Option<u64>,
}

/// A loaded, checked LLM function definition.
#[derive(Debug)]
pub struct FunctionDef {
    /// SQL name.
    pub name: String,
    /// Human description (shown by tooling).
    pub description: Option<String>,
    /// Argument names, in SQL order; each is a template variable.
    pub args: Vec<String>,
    /// Model name from `sluice.toml`.
    pub model: String,
    /// System template source (with `rows_per_prompt`: none; the shared one is in `packing`).
    pub system: Option<String>,
    /// Prompt template source (with `rows_per_prompt`: the per-row `item` template).
    pub prompt: String,
    /// Generation limit.
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Structured output, if declared.
    pub output: Option<OutputSchema>,
    /// Failure policy.
    pub on_error: OnError,
    /// Where it was defined (for messages).
    pub source: PathBuf,
    /// With `rows_per_prompt`: the shared prompt the rows' items are packed into.
    pub packing: Option<std::sync::Arc<super::pack::Packing>>,
    /// A completion, an embedding or an aggregate.
    pub kind: FunctionKind,
    /// An aggregate's budget of prompt tokens per call, and its `reduce` template (in `env`).
    pub reduce: Option<super::aggregate::Reduce>,
    pub(super) env: Environment<'static>,
    /// The system and prompt templates pre-split, when both are plain.
    plain: Option<PlainTemplates>,
}

/// A function's system and prompt templates when both are only literal text and `{{ arg }}`
/// substitutions: a row whose arguments are strings renders by concatenation, with the same
/// output as [`FunctionDef::render`].
#[derive(Debug, Clone, PartialEq)]
pub struct PlainTemplates {
    system: Option<Splice>,
    prompt: Splice,
}

impl PlainTemplates {
    /// Renders one row; `values[i]` binds argument `i`.
    pub fn render(&self, values: &[&str]) -> RenderedPrompt {
        RenderedPrompt {
            system: self.system.as_ref().map(|s| s.render(values)),
            user: self.prompt.render(values),
        }
    }
}

/// A template that is only literal text and `{{ arg }}` substitutions, split at them once at
/// load time, so that a row whose arguments are strings renders by concatenation: the same text
/// minijinja outputs, without evaluating the template for every row.
#[derive(Debug, Clone, PartialEq)]
struct Splice(Vec<Piece>);

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Arg(usize),
}

/// Marks argument `i` in a sentinel rendering (private-use characters a template cannot hold).
const SENTINEL_OPEN: char = '\u{F8FF}';
const SENTINEL_CLOSE: char = '\u{F8FE}';

impl Splice {
    /// The splice of template `name` (source `source`) in `env`, if the source has no
    /// statements or comments and every `{{ ... }}` is a bare argument name. The literal text
    /// comes from minijinja itself (rendering with a sentinel per argument), so whitespace
    /// control and the dropped trailing newline are exactly minijinja's.
    fn of(env: &Environment, name: &str, source: &str, args: &[String]) -> Option<Splice> {
        if source.contains("{%")
            || source.contains("{#")
            || source.contains([SENTINEL_OPEN, SENTINEL_CLOSE])
        {
            return None;
        }
        let mut substitutions = 0;
        let mut rest = source;
        while let Some(open) = rest.find("{{") {
            let after = &rest[open + 2..];
            let close = after.find("}}")?;
            let inner = &after[..close];
            let inner = inner.strip_prefix(['-', '+']).unwrap_or(inner);
            let inner = inner.strip_suffix(['-', '+']).unwrap_or(inner).trim();
            if !args.iter().any(|a| a == inner) {
                return None;
            }
            substitutions += 1;
            rest = &after[close + 2..];
        }
        let ctx: std::collections::BTreeMap<&str, String> = args
            .iter()
            .enumerate()
            .map(|(i, a)| (a.as_str(), format!("{SENTINEL_OPEN}{i}{SENTINEL_CLOSE}")))
            .collect();
        let rendered = env.get_template(name).ok()?.render(&ctx).ok()?;
        let mut pieces = Vec::new();
        let mut rest = rendered.as_str();
        while let Some(open) = rest.find(SENTINEL_OPEN) {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let after = &rest[open + SENTINEL_OPEN.len_utf8()..];
            let close = after.find(SENTINEL_CLOSE)?;
            let i: usize = after[..close].parse().ok()?;
            pieces.push(Piece::Arg(i));
            rest = &after[close + SENTINEL_CLOSE.len_utf8()..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        let args_placed = pieces.iter().filter(|p| matches!(p, Piece::Arg(_))).count();
        (args_placed == substitutions).then_some(Splice(pieces))
    }

    fn render(&self, values: &[&str]) -> String {
        let len = self
            .0
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.len(),
                Piece::Arg(i) => values[*i].len(),
            })
            .sum();
        let mut out = String::with_capacity(len);
        for p in &self.0 {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Arg(i) => out.push_str(values[*i]),
            }
        }
        out
    }
}

/// The function's and its arguments' names are identifiers, each argument listed once.
fn check_names(name: &str, args: &[String]) -> Result<(), String> {
    if !is_identifier(name) {
        return Err(format!(
            "name {name:?} is not a valid SQL function name (letters, digits, _)"
        ));
    }
    let mut seen = HashSet::new();
    for a in args {
        if !is_identifier(a) {
            return Err(format!("argument name {a:?} is not an identifier"));
        }
        if !seen.insert(a) {
            return Err(format!("argument {a:?} is listed twice in args"));
        }
    }
    Ok(())
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl FunctionDef {
    /// Builds a definition from parts (used for the built-in `llm` function and by tests).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        args: Vec<String>,
        model: &str,
        system: Option<String>,
        prompt: String,
        output: Option<OutputSchema>,
        source: PathBuf,
    ) -> Result<FunctionDef, DefError> {
        let invalid = |message: String| DefError::Invalid {
            path: source.clone(),
            message,
        };
        check_names(name, &args).map_err(invalid)?;
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(false);
        let mut templates = vec![("prompt", prompt.clone())];
        if let Some(s) = &system {
            templates.push(("system", s.clone()));
        }
        for (tname, src) in templates {
            env.add_template_owned(tname.to_string(), src)
                .map_err(|e| invalid(format!("{tname} template: {}", jinja_message(&e))))?;
            let t = env
                .get_template(tname)
                .map_err(|e| invalid(format!("{tname} template: {}", jinja_message(&e))))?;
            let used: BTreeSet<String> = t.undeclared_variables(false).into_iter().collect();
            let unknown: Vec<&String> = used.iter().filter(|v| !args.contains(v)).collect();
            if !unknown.is_empty() {
                return Err(invalid(format!(
                    "{tname} template uses undefined variable(s) {}; declared args are [{}]",
                    unknown
                        .iter()
                        .map(|s| format!("{s:?}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    args.join(", ")
                )));
            }
        }
        let plain = match &system {
            Some(src) => Splice::of(&env, "system", src, &args).map(Some),
            None => Some(None),
        }
        .and_then(|system| {
            Some(PlainTemplates {
                system,
                prompt: Splice::of(&env, "prompt", &prompt, &args)?,
            })
        });
        Ok(FunctionDef {
            name: name.to_string(),
            description: None,
            args,
            model: model.to_string(),
            system,
            prompt,
            max_tokens: None,
            temperature: None,
            output,
            on_error: OnError::Null,
            source,
            packing: None,
            kind: FunctionKind::Completion,
            reduce: None,
            env,
            plain,
        })
    }

    /// Parses one `udfs/*.toml` file's text.
    pub fn parse(text: &str, path: &Path) -> Result<FunctionDef, DefError> {
        let invalid = |message: String| DefError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let raw: RawDef = toml::from_str(text)
            .map_err(|e| invalid(e.to_string().trim_end().replace('\n', " ")))?;
        let output = super::kind::output_schema(
            raw.kind,
            raw.output,
            raw.dim,
            raw.rows_per_prompt.is_some(),
        )
        .map_err(invalid)?;
        if let Some(t) = raw.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(invalid(format!("temperature {t} is outside 0.0..=2.0")));
        }
        if raw.max_tokens == Some(0) {
            return Err(invalid("max_tokens must be at least 1".into()));
        }
        let (system, prompt, packing) = super::pack::templates(
            raw.rows_per_prompt,
            raw.item,
            raw.prompt,
            raw.system,
            &raw.args,
        )
        .map_err(invalid)?;
        let mut def = FunctionDef::new(
            &raw.name,
            raw.args,
            raw.model.as_deref().unwrap_or("default"),
            system,
            prompt,
            output,
            path.to_path_buf(),
        )?;
        def.packing = packing;
        def.kind = raw.kind;
        def.reduce =
            super::aggregate::check(&mut def, raw.reduce, raw.max_input_tokens).map_err(invalid)?;
        def.description = raw.description;
        def.max_tokens = raw.max_tokens;
        def.temperature = raw.temperature;
        def.on_error = raw.on_error;
        Ok(def)
    }

    /// Loads every `*.toml` in `dir` (sorted by file name). A missing directory yields no functions.
    pub fn load_dir(dir: &Path) -> Result<Vec<FunctionDef>, DefError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(source) => {
                return Err(DefError::Io {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        paths.sort();
        let mut defs: Vec<FunctionDef> = Vec::with_capacity(paths.len());
        for path in paths {
            let text = std::fs::read_to_string(&path).map_err(|source| DefError::Io {
                path: path.clone(),
                source,
            })?;
            let def = FunctionDef::parse(&text, &path)?;
            if let Some(prev) = defs.iter().find(|d| d.name == def.name) {
                return Err(DefError::Invalid {
                    path: path.clone(),
                    message: format!(
                        "function {:?} is already defined in {}",
                        def.name,
                        prev.source.display()
                    ),
                });
            }
            defs.push(def);
        }
        Ok(defs)
    }

    /// The templates pre-split for rendering by concatenation; `None` when a template is more
    /// than literal text and `{{ arg }}` substitutions (use [`FunctionDef::render`]).
    pub fn plain_templates(&self) -> Option<&PlainTemplates> {
        self.plain.as_ref()
    }

    /// Renders system and prompt for one row; `values[i]` binds `self.args[i]`.
    pub fn render(&self, values: &[JinjaValue]) -> Result<RenderedPrompt, String> {
        let ctx: JinjaValue = self
            .args
            .iter()
            .cloned()
            .zip(values.iter().cloned())
            .collect::<std::collections::BTreeMap<String, JinjaValue>>()
            .into();
        // The output is about the template plus its arguments: reserve that up front, so that a
        // prompt carrying a long passage is not grown (and copied) step by step.
        let args_len: usize = values.iter().filter_map(|v| v.as_str()).map(str::len).sum();
        let render = |name: &str| -> Result<String, String> {
            let template = self
                .env
                .get_template(name)
                .map_err(|e| format!("{name} template: {}", jinja_message(&e)))?;
            let mut out = Vec::with_capacity(template.source().len() + args_len);
            template
                .render_captured_to(&ctx, &mut out)
                .map_err(|e| format!("{name} template: {}", jinja_message(&e)))?;
            String::from_utf8(out).map_err(|e| format!("{name} template: {e}"))
        };
        let system = match self.system {
            Some(_) => Some(render("system")?),
            None => None,
        };
        Ok(RenderedPrompt {
            system,
            user: render("prompt")?,
        })
    }
}

fn jinja_message(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    if let Some(line) = e.line()
        && !msg.contains("line")
    {
        msg.push_str(&format!(" (line {line})"));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "ask"
args = ["ticker", "passage"]
system = "You analyse {{ ticker }}."
prompt = "Read {{ passage }} about {{ ticker }}."
output = { type = "array", items = { type = "string" }, minItems = 3, maxItems = 3 }
"#;

    #[test]
    fn loads_and_renders() {
        let d = FunctionDef::parse(GOOD, Path::new("udfs/ask.toml")).unwrap();
        let r = d
            .render(&[JinjaValue::from("ACME"), JinjaValue::from("text")])
            .unwrap();
        assert_eq!(r.system.as_deref(), Some("You analyse ACME."));
        assert_eq!(r.user, "Read text about ACME.");
        assert_eq!(d.model, "default");
    }

    #[test]
    fn undefined_variable_is_a_load_error() {
        let e = FunctionDef::parse(
            &GOOD.replace("{{ passage }}", "{{ pasage }}"),
            Path::new("udfs/ask.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("udfs/ask.toml") && e.contains("\"pasage\""),
            "{e}"
        );
    }

    #[test]
    fn broken_template_and_schema_and_toml_are_load_errors() {
        let e = FunctionDef::parse(
            &GOOD.replace("{{ passage }}", "{{ passage "),
            Path::new("f.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("prompt template"), "{e}");
        let e = FunctionDef::parse(&GOOD.replace("\"string\"", "\"date\""), Path::new("f.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("output.items"), "{e}");
        let e = FunctionDef::parse("name = ", Path::new("f.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("f.toml:"), "{e}");
        let e = FunctionDef::parse(&format!("{GOOD}\ncolour = 1"), Path::new("f.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn plain_templates_render_by_concatenation_exactly_as_minijinja() {
        let args = vec!["a".to_string(), "b".to_string()];
        let def = |system: Option<&str>, prompt: &str| {
            FunctionDef::new(
                "f",
                args.clone(),
                "default",
                system.map(str::to_string),
                prompt.to_string(),
                None,
                PathBuf::from("f.toml"),
            )
            .unwrap()
        };
        let plain = [
            "{{ a }}",
            "x {{a}} y {{ b }} z {{ a }}",
            "line\n  {{- a -}}  \n{{ b }}\n",
            "{{ a }}\n\n",
            "{{+ a +}} {{ b -}}\n\n  end",
            "only text, no variables\n",
            "{{ a }}{{ b }}",
            "",
            "unicode é {{ b }} ✓",
        ];
        let values = [
            ["", ""],
            ["{{ b }}", "{% if %}"],
            ["trailing\n", "\nleading"],
            ["é ✓ \u{1F600}", "  spaces  "],
        ];
        for t in plain {
            for system in [None, Some("sys {{ b }}."), Some("constant")] {
                let d = def(system, t);
                let plain = d
                    .plain_templates()
                    .unwrap_or_else(|| panic!("{t:?} is plain"));
                for v in values {
                    let jv: Vec<JinjaValue> = v.iter().map(|s| JinjaValue::from(*s)).collect();
                    assert_eq!(
                        plain.render(&v),
                        d.render(&jv).unwrap(),
                        "template {t:?}, system {system:?}, values {v:?}"
                    );
                }
            }
        }
        for t in [
            "{{ a | upper }}",
            "{% if a %}{{ b }}{% endif %}",
            "{# note #}{{ a }}",
            "{{ a ~ b }}",
            "{{ -a }}",
            "{{ a.b }}",
            "{{ \"a\" }}",
        ] {
            assert!(
                def(None, t).plain_templates().is_none(),
                "{t:?} is not plain"
            );
            assert!(
                def(Some(t), "{{ a }}").plain_templates().is_none(),
                "system {t:?}"
            );
        }
    }
}
