//! Templates that are only literal text and `{{ arg }}` substitutions, rendered by
//! concatenation: the same text minijinja outputs, without evaluating the template per row.

use minijinja::Environment;

use crate::types::{PromptCuts, RenderedPrompt};

/// A function's system and prompt templates when both are only literal text and `{{ arg }}`
/// substitutions: a row whose arguments are strings renders by concatenation, with the same
/// output as [`FunctionDef::render`].
#[derive(Debug, Clone, PartialEq)]
pub struct PlainTemplates {
    system: Option<Splice>,
    prompt: Splice,
}

impl PlainTemplates {
    /// The splices of a function's `system` and `prompt` (compiled in `env`), when both are
    /// plain.
    pub(super) fn of(
        env: &Environment,
        system: Option<&str>,
        prompt: &str,
        args: &[String],
    ) -> Option<PlainTemplates> {
        let system = match system {
            Some(src) => Some(Splice::of(env, "system", src, args)?),
            None => None,
        };
        Some(PlainTemplates {
            system,
            prompt: Splice::of(env, "prompt", prompt, args)?,
        })
    }

    /// Renders one row; `values[i]` binds argument `i`. The user text's cuts are where its
    /// first argument and its last argument (`values`' last) begin.
    pub fn render(&self, values: &[&str]) -> RenderedPrompt {
        let (user, cuts) = self.prompt.render_cut(values);
        RenderedPrompt {
            system: self.system.as_ref().map(|s| s.render(values)),
            user,
            cuts,
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
        self.render_cut(values).0
    }

    /// The text, and where its first argument and the first substitution of the last argument
    /// begin (0 when the template has none).
    fn render_cut(&self, values: &[&str]) -> (String, PromptCuts) {
        let last = values.len().checked_sub(1);
        let mut cuts = PromptCuts::default();
        let mut first_seen = false;
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
                Piece::Arg(i) => {
                    if !first_seen {
                        first_seen = true;
                        cuts.common = out.len();
                    }
                    if Some(*i) == last && cuts.row == 0 {
                        cuts.row = out.len();
                    }
                    out.push_str(values[*i]);
                }
            }
        }
        (out, cuts)
    }
}
