//! What every template of a function shares: one minijinja environment per definition, strict
//! about undefined variables, and messages that name the template and line.

use std::collections::BTreeSet;

use minijinja::{Environment, UndefinedBehavior};

/// An environment for a function's templates: an undefined variable is an error, and the
/// trailing newline of a template is dropped.
pub(super) fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(false);
    env
}

/// Adds template `name` to `env` and returns the variables it uses.
pub(super) fn add(
    env: &mut Environment<'static>,
    name: &str,
    source: String,
) -> Result<BTreeSet<String>, String> {
    env.add_template_owned(name.to_string(), source)
        .map_err(|e| format!("{name} template: {}", jinja_message(&e)))?;
    let t = env
        .get_template(name)
        .map_err(|e| format!("{name} template: {}", jinja_message(&e)))?;
    Ok(t.undeclared_variables(false).into_iter().collect())
}

/// The templates of `env`, sorted by name, as one line.
pub(super) fn sources(env: &Environment<'_>) -> String {
    let mut all: Vec<(&str, String)> = env
        .templates()
        .map(|(n, t)| (n, t.source().to_string()))
        .collect();
    all.sort_unstable();
    all.iter()
        .map(|(n, s)| format!("{n}={s:?}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A minijinja error on one line, with its line number.
pub(super) fn jinja_message(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    if let Some(line) = e.line()
        && !msg.contains("line")
    {
        msg.push_str(&format!(" (line {line})"));
    }
    msg
}
