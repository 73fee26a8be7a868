//! Many rows per prompt (`rows_per_prompt = N` in a function's TOML): each row renders only its
//! `item` (from its arguments); the `prompt` (and `system`) are shared by the rows of a request
//! and list them through `items` (and `n`, how many there are):
//!
//! ```toml
//! name = "topic"
//! args = ["passage"]
//! rows_per_prompt = 10
//! item = "{{ passage }}"
//! prompt = """Give the topic of each of these {{ n }} passages.
//! {% for item in items %}### Item {{ loop.index }}
//! {{ item }}
//! {% endfor %}"""
//! output = { type = "string", enum = ["guidance", "margins", "other"] }
//! ```
//!
//! One row alone is the prompt with one item; its request key is that prompt's, whatever N, so
//! a run with another N (or N = 1) finds the same cache entries. The dispatcher packs the rows
//! that miss the cache (`llm::dispatch::pack`); this is the template side.

use std::sync::Arc;

use minijinja::{Environment, context};

use super::template::{add, environment, sources};
use crate::llm::dispatch::Packer;
use crate::types::RenderedPrompt;

/// A function's system, prompt (for a packed one: its `item`) and packing, from its TOML's
/// `rows_per_prompt`, `item`, `prompt` and `system`.
pub(super) type Templates = (Option<String>, String, Option<Arc<Packing>>);

/// Splits a function's templates: a packed function (`rows_per_prompt`) renders its `item`
/// per row and shares `prompt` and `system`; any other renders `prompt` and `system` per row.
pub(super) fn templates(
    rows: Option<usize>,
    item: Option<String>,
    prompt: String,
    system: Option<String>,
    args: &[String],
) -> Result<Templates, String> {
    match (rows, item) {
        (None, None) => Ok((system, prompt, None)),
        (Some(rows), Some(item)) => {
            let packing = Packing::new(rows, &prompt, system.as_deref(), args)?;
            Ok((None, item, Some(Arc::new(packing))))
        }
        (Some(_), None) => Err(
            "rows_per_prompt needs item, the text of one row (e.g. item = \"{{ passage }}\"), \
             and a prompt that lists the items ({% for item in items %}...)"
                .into(),
        ),
        (None, Some(_)) => Err(
            "item is the text of one row of a packed prompt: set rows_per_prompt too, or leave \
             item out"
                .into(),
        ),
    }
}

/// The variables a packed function's shared templates may use.
const SHARED_VARS: [&str; 2] = ["items", "n"];

/// The shared templates of a packed function.
#[derive(Debug)]
pub struct Packing {
    rows: usize,
    env: Environment<'static>,
    has_system: bool,
}

impl Packing {
    /// Checks the shared `prompt` and `system` of a function packing `rows` rows; `args` are
    /// the function's arguments (which belong in `item`, not here).
    pub(super) fn new(
        rows: usize,
        prompt: &str,
        system: Option<&str>,
        args: &[String],
    ) -> Result<Packing, String> {
        if rows == 0 {
            return Err("rows_per_prompt must be at least 1".into());
        }
        let mut env = environment();
        let mut templates = vec![("prompt", prompt)];
        templates.extend(system.map(|s| ("system", s)));
        for (name, src) in templates {
            let used = add(&mut env, name, src.to_string())?;
            if let Some(arg) = used.iter().find(|v| args.contains(v)) {
                return Err(format!(
                    "this function cannot be packed: its {name} template uses {{{{ {arg} }}}}, but \
                     with rows_per_prompt the {name} is shared by the rows of a request and may \
                     use only items and n; put the row's arguments in item"
                ));
            }
            if let Some(v) = used.iter().find(|v| !SHARED_VARS.contains(&v.as_str())) {
                return Err(format!(
                    "{name} template uses undefined variable {v:?}; with rows_per_prompt it sees \
                     items (the rows' rendered item templates) and n"
                ));
            }
            if name == "prompt" && !used.contains("items") {
                return Err(
                    "this function cannot be packed: with rows_per_prompt its prompt must list \
                     the rows' items ({% for item in items %}...{% endfor %})"
                        .into(),
                );
            }
        }
        Ok(Packing {
            rows,
            env,
            has_system: system.is_some(),
        })
    }
}

impl Packing {
    /// The shared templates' names and sources, and the rows per request (what identifies the
    /// packing, for a worker comparing definitions).
    pub(super) fn identity(&self) -> String {
        format!("rows={} {}", self.rows, sources(&self.env))
    }
}

impl Packer for Packing {
    fn rows(&self) -> usize {
        self.rows
    }

    fn render(&self, items: &[&str]) -> Result<RenderedPrompt, String> {
        let ctx = context! { items => items, n => items.len() };
        let render = |name: &str| {
            self.env
                .get_template(name)
                .and_then(|t| t.render(&ctx))
                .map_err(|e| format!("{name} template: {e}"))
        };
        Ok(RenderedPrompt {
            system: if self.has_system {
                Some(render("system")?)
            } else {
                None
            },
            user: render("prompt")?,
            cuts: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Vec<String> {
        vec!["passage".to_string()]
    }

    #[test]
    fn renders_the_rows_items_into_one_prompt() {
        let p = Packing::new(
            4,
            "{{ n }} passages:\n{% for item in items %}- {{ item }}\n{% endfor %}",
            Some("Label {{ n }}."),
            &args(),
        )
        .unwrap();
        let r = p.render(&["a", "b"]).unwrap();
        assert_eq!(r.user, "2 passages:\n- a\n- b\n");
        assert_eq!(r.system.as_deref(), Some("Label 2."));
        assert_eq!(p.rows(), 4);
    }

    #[test]
    fn refuses_shared_templates_that_cannot_be_packed() {
        let e = Packing::new(4, "Label {{ passage }}", None, &args()).unwrap_err();
        assert!(e.contains("cannot be packed") && e.contains("item"), "{e}");
        let e = Packing::new(4, "Label these.", None, &args()).unwrap_err();
        assert!(e.contains("must list"), "{e}");
        let e = Packing::new(4, "{{ items }}", Some("{{ passage }}"), &args()).unwrap_err();
        assert!(e.contains("system template uses {{ passage }}"), "{e}");
        assert!(Packing::new(0, "{{ items }}", None, &args()).is_err());
    }
}
