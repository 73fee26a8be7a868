//! An aggregate's reduction (`max_input_tokens`, `reduce`): a group whose prompt would not fit
//! is answered by a tree of calls — as many values as fit in each, then the partial results
//! folded with the `reduce` template until one remains. This is the definition's side; the
//! calls are made by `aggregate`.

use minijinja::Environment;

use super::template::add;

/// An aggregate's budget and reduce template (`max_input_tokens`, `reduce`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reduce {
    /// Most prompt tokens of one call (counted with the model's tokenizer).
    pub max_input_tokens: u64,
}

/// Whether `src` has `{% for x in var %}`.
fn loops_over(src: &str, var: &str) -> bool {
    let pattern = format!(
        r"\{{%-?\s*for\s+\w+(\s*,\s*\w+)?\s+in\s+{}\b",
        regex::escape(var)
    );
    regex::Regex::new(&pattern).is_ok_and(|r| r.is_match(src))
}

/// Checks an aggregate's templates: its `prompt` loops over the group's values (its first
/// argument), and a `reduce` template, added to `env`, folds the partial results of a group
/// that does not fit `max_input_tokens`.
pub(super) fn check(
    env: &mut Environment<'static>,
    args: &[String],
    prompt: &str,
    (reduce, max_input_tokens): (Option<String>, Option<u64>),
) -> Result<Option<Reduce>, String> {
    let Some(list) = args.first().cloned() else {
        return Err(
            "an aggregate function needs an argument: the column whose values it sees".into(),
        );
    };
    if !loops_over(prompt, &list) {
        return Err(format!(
            "an aggregate's prompt sees the group's values of {list} as a list and must loop \
             over them ({{% for v in {list} %}}...{{% endfor %}})"
        ));
    }
    let Some(max) = max_input_tokens else {
        return match reduce {
            Some(_) => {
                Err("reduce is used when a group does not fit max_input_tokens: set it".into())
            }
            None => Ok(None),
        };
    };
    let Some(reduce) = reduce else {
        return Err(format!(
            "max_input_tokens = {max} needs a reduce template, which folds the partial results \
             of a group that does not fit ({{% for p in partials %}}...)"
        ));
    };
    if !loops_over(&reduce, "partials") {
        return Err(
            "the reduce template must loop over partials ({% for p in partials %}...)".into(),
        );
    }
    let used = add(env, "reduce", reduce)?;
    if let Some(v) = used
        .iter()
        .find(|v| *v != "partials" && !args[1..].contains(v))
    {
        return Err(format!(
            "reduce template uses undefined variable {v:?}; it sees partials and the constant \
             arguments [{}]",
            args[1..].join(", ")
        ));
    }
    Ok(Some(Reduce {
        max_input_tokens: max,
    }))
}
