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

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use minijinja::{Environment, Value as JinjaValue};
use serde::Deserialize;

pub use super::kind::FunctionKind;
use super::kind::{KindName, declared_schema, embedding_schema};
pub use super::plain::PlainTemplates;
pub use super::stages::CascadeStage;
use super::stages::{self, RawStage};
use super::template::{add, environment, jinja_message, sources};
use crate::types::{OutputSchema, RenderedPrompt};

/// Name of the generic function `llm(prompt [, model])`.
pub(crate) const GENERIC_LLM: &str = "llm";

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

/// A function's TOML as serde reads it.
#[derive(Debug, Deserialize, Default)]
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
    kind: KindName,
    dim: Option<usize>,
    reduce: Option<String>,
    max_input_tokens: Option<u64>,
    cascade: Option<Vec<RawStage>>,
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
    /// Model name from `sluice.toml` (with a cascade: its first model).
    pub model: String,
    /// The models of its cascade, in order (empty without one).
    pub cascade: Vec<CascadeStage>,
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
    /// A completion (perhaps packed), an embedding or an aggregate, with what only its kind
    /// has.
    pub kind: FunctionKind,
    /// The compiled templates: `prompt`, `system`, and an aggregate's `reduce`.
    env: Environment<'static>,
    /// The system and prompt templates pre-split, when both are plain.
    plain: Option<PlainTemplates>,
}

/// The keys only some kinds take, checked together: the output schema (an embedding's from its
/// `dim`) and the vector length (0 unless an embedding).
fn kind_keys(raw: &RawDef) -> Result<(Option<OutputSchema>, usize), String> {
    let packed = raw.rows_per_prompt.is_some();
    let kind_name = raw.kind;
    match kind_name {
        KindName::Embedding if packed => {
            return Err(
                "an embedding function takes many inputs per request already \
                        (prompts_per_request of its model); leave rows_per_prompt out"
                    .into(),
            );
        }
        KindName::Aggregate if packed => {
            return Err(
                "an aggregate function makes one call per group; leave rows_per_prompt out".into(),
            );
        }
        KindName::Embedding => {}
        _ if raw.dim.is_some() => {
            return Err(
                "dim is the vector length of kind = \"embedding\"; set kind or leave \
                        dim out"
                    .into(),
            );
        }
        _ => {}
    }
    if kind_name != KindName::Aggregate && (raw.reduce.is_some() || raw.max_input_tokens.is_some())
    {
        return Err("reduce and max_input_tokens are for kind = \"aggregate\"".into());
    }
    let (output, dim) = match (kind_name, raw.output.clone(), raw.dim) {
        (KindName::Embedding, None, Some(dim)) => (Some(embedding_schema(dim)?), dim),
        (KindName::Embedding, _, _) => {
            return Err(
                "an embedding function returns its vector: give its length as dim \
                        (e.g. dim = 1536) and leave output out"
                    .into(),
            );
        }
        (_, output, _) => (declared_schema(output)?, 0),
    };
    Ok((output, dim))
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
    /// Parses one `udfs/*.toml` file's text.
    pub fn parse(text: &str, path: &Path) -> Result<FunctionDef, DefError> {
        let invalid = |message: String| DefError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let raw: RawDef = toml::from_str(text)
            .map_err(|e| invalid(e.to_string().trim_end().replace('\n', " ")))?;
        FunctionDef::build(raw, path).map_err(invalid)
    }

    /// The built-in `llm(prompt [, model])`: the prompt is sent as it is, to the default model
    /// (or the one named in SQL).
    pub fn generic() -> FunctionDef {
        let raw = RawDef {
            name: GENERIC_LLM.into(),
            description: Some("The prompt as it is, answered by the default model".into()),
            args: vec!["prompt".into()],
            prompt: "{{ prompt }}".into(),
            ..RawDef::default()
        };
        FunctionDef::build(raw, Path::new("<built-in llm>"))
            .expect("the built-in llm definition is valid")
    }

    /// Every definition is built here, once: the keys its kind takes are checked together,
    /// its templates compiled and their variables checked against `args`.
    fn build(raw: RawDef, path: &Path) -> Result<FunctionDef, String> {
        check_names(&raw.name, &raw.args)?;
        if let Some(t) = raw.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(format!("temperature {t} is outside 0.0..=2.0"));
        }
        if raw.max_tokens == Some(0) {
            return Err("max_tokens must be at least 1".into());
        }
        let (output, dim) = kind_keys(&raw)?;
        let cascade = stages::check(raw.cascade.as_deref(), raw.model.is_some(), raw.kind)?;
        let (system, prompt, packing) = super::pack::templates(
            raw.rows_per_prompt,
            raw.item,
            raw.prompt,
            raw.system,
            &raw.args,
        )?;
        let mut env = environment();
        let mut templates = vec![("prompt", prompt.clone())];
        templates.extend(system.clone().map(|s| ("system", s)));
        for (name, source) in templates {
            let used = add(&mut env, name, source)?;
            let unknown: Vec<&String> = used.iter().filter(|v| !raw.args.contains(v)).collect();
            if !unknown.is_empty() {
                return Err(format!(
                    "{name} template uses undefined variable(s) {}; declared args are [{}]",
                    unknown
                        .iter()
                        .map(|s| format!("{s:?}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    raw.args.join(", ")
                ));
            }
        }
        let plain = PlainTemplates::of(&env, system.as_deref(), &prompt, &raw.args);
        let aggregate_keys = (raw.reduce, raw.max_input_tokens);
        let kind = match raw.kind {
            KindName::Completion => FunctionKind::Completion { packing },
            KindName::Embedding => FunctionKind::Embedding { dim },
            KindName::Aggregate => FunctionKind::Aggregate {
                reduce: super::reduce::check(&mut env, &raw.args, &prompt, aggregate_keys)?,
            },
        };
        Ok(FunctionDef {
            name: raw.name,
            description: raw.description,
            args: raw.args,
            model: match cascade.first() {
                Some(first) => first.model.clone(),
                None => raw.model.unwrap_or_else(|| "default".into()),
            },
            cascade,
            system,
            prompt,
            max_tokens: raw.max_tokens,
            temperature: raw.temperature,
            output,
            on_error: raw.on_error,
            source: path.to_path_buf(),
            kind,
            env,
            plain,
        })
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
            .collect::<BTreeMap<String, JinjaValue>>()
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
            cuts: Default::default(),
        })
    }

    /// Renders an aggregate's `reduce` template over `partials` (its constant arguments bound
    /// to `consts`, the arguments after the first).
    pub(super) fn render_reduce(
        &self,
        consts: &[JinjaValue],
        partials: Vec<JinjaValue>,
    ) -> Result<String, String> {
        let mut ctx: BTreeMap<String, JinjaValue> = self.args[1..]
            .iter()
            .cloned()
            .zip(consts.iter().cloned())
            .collect();
        ctx.insert("partials".into(), JinjaValue::from(partials));
        self.env
            .get_template("reduce")
            .and_then(|t| t.render(JinjaValue::from(ctx)))
            .map_err(|e| format!("reduce template: {e}"))
    }

    /// The compiled templates' names and sources, as one line.
    pub(super) fn template_sources(&self) -> String {
        sources(&self.env)
    }
}

/// Two definitions are the same only if they are one (a session's functions are loaded once).
impl PartialEq for FunctionDef {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}
impl Eq for FunctionDef {}
impl std::hash::Hash for FunctionDef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
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
            let raw = RawDef {
                name: "f".into(),
                args: args.clone(),
                system: system.map(str::to_string),
                prompt: prompt.to_string(),
                ..RawDef::default()
            };
            FunctionDef::build(raw, Path::new("f.toml")).unwrap()
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
                    let (fast, slow) = (plain.render(&v), d.render(&jv).unwrap());
                    assert_eq!(
                        (fast.system, fast.user),
                        (slow.system, slow.user),
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

    #[test]
    fn plain_templates_cut_before_the_first_and_the_last_argument() {
        let d = FunctionDef::parse(
            "name = \"f\"\nargs = [\"passage\", \"question\"]\nsystem = \"Be brief.\"\n\
             prompt = \"Passage: {{ passage }}\\nQuestion: {{ question }}\\nAnswer.\"\n",
            Path::new("f.toml"),
        )
        .unwrap();
        let p = d.plain_templates().unwrap().render(&["the text", "why?"]);
        assert_eq!(p.user, "Passage: the text\nQuestion: why?\nAnswer.");
        assert_eq!(&p.user[..p.cuts.common], "Passage: ");
        assert_eq!(&p.user[..p.cuts.row], "Passage: the text\nQuestion: ");
    }
}
