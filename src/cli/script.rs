//! The script a command runs: a file, `-` for stdin, or `-c "SQL"`, with `--set NAME=VALUE`
//! substituted into `${NAME}` (or `${NAME:-default}`) before the SQL is parsed.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use super::exit::Failure;

/// Where the SQL comes from, and the values substituted into it.
#[derive(Debug, clap::Args)]
pub struct ScriptArgs {
    /// The SQL file (`-` reads the script from stdin).
    #[arg(required_unless_present = "command", conflicts_with = "command")]
    pub file: Option<PathBuf>,
    /// The script itself, instead of a file: `sluice run -c "SELECT ..."`.
    #[arg(short = 'c', long = "command", value_name = "SQL")]
    pub command: Option<String>,
    /// `NAME=VALUE`: every `${NAME}` of the script becomes VALUE (repeatable), so that one file
    /// runs on another corpus or bucket. `${NAME:-default}` has a default.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub set: Vec<String>,
}

/// A script ready to run: its text after substitution and its name for messages.
#[derive(Debug)]
pub(crate) struct Script {
    pub(crate) sql: String,
    pub(crate) origin: String,
}

impl ScriptArgs {
    /// Reads the script and substitutes the `--set` values.
    pub(crate) fn load(&self) -> Result<Script, Failure> {
        let (text, origin) = match (&self.command, &self.file) {
            (Some(sql), _) => (sql.clone(), "<command>".to_string()),
            (None, Some(p)) if p.as_os_str() == "-" => {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s).map_err(|e| {
                    Failure::statement(format!("cannot read the script from stdin: {e}"))
                })?;
                (s, "<stdin>".to_string())
            }
            (None, Some(p)) => (
                std::fs::read_to_string(p)
                    .map_err(|e| Failure::statement(format!("cannot read {}: {e}", p.display())))?,
                p.display().to_string(),
            ),
            (None, None) => return Err(Failure::config("give a SQL file, - or -c \"SQL\"")),
        };
        let values = parse_sets(&self.set)?;
        let (sql, unused) = substitute(&text, &values).map_err(Failure::config)?;
        for name in unused {
            eprintln!("warning: --set {name}: the script has no ${{{name}}}");
        }
        Ok(Script { sql, origin })
    }
}

/// `NAME=VALUE` pairs; a name is letters, digits and `_`, not starting with a digit.
fn parse_sets(sets: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    let mut values = BTreeMap::new();
    for s in sets {
        let Some((name, value)) = s.split_once('=') else {
            return Err(Failure::config(format!("--set {s}: expected NAME=VALUE")));
        };
        if !is_name(name) {
            return Err(Failure::config(format!(
                "--set {s}: {name:?} is not a name (letters, digits and _, not starting with a digit)"
            )));
        }
        values.insert(name.to_string(), value.to_string());
    }
    Ok(values)
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Replaces `${NAME}` and `${NAME:-default}` in `text`; returns the result and the names given
/// but never used. A `${NAME}` without a value or default is an error naming it; `$${` is a
/// literal `${`; any other `$` is left as it is.
pub(crate) fn substitute(
    text: &str,
    values: &BTreeMap<String, String>,
) -> Result<(String, Vec<String>), String> {
    let mut out = String::with_capacity(text.len());
    let mut used = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
            continue;
        }
        let Some(body_end) = after.strip_prefix("${").and_then(|b| b.find('}')) else {
            out.push('$');
            rest = &after[1..];
            continue;
        };
        let body = &after[2..2 + body_end];
        let (name, default) = match body.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (body, None),
        };
        if !is_name(name) {
            out.push('$');
            rest = &after[1..];
            continue;
        }
        match (values.get(name), default) {
            (Some(v), _) => {
                out.push_str(v);
                used.insert(name.to_string());
            }
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "the script uses ${{{name}}} but no value was given: pass --set {name}=VALUE \
                     (or write ${{{name}:-default}})"
                ));
            }
        }
        rest = &after[2 + body_end + 1..];
    }
    out.push_str(rest);
    let unused = values
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .collect();
    Ok((out, unused))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(text: &str, sets: &[(&str, &str)]) -> Result<(String, Vec<String>), String> {
        let values = sets
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        substitute(text, &values)
    }

    #[test]
    fn values_defaults_and_literals() {
        let (s, unused) = sub(
            "LOCATION '${CORPUS}' -- ${N:-5} $x $${KEEP} ${not a name} ${CORPUS}",
            &[("CORPUS", "s3://b/c.jsonl"), ("EXTRA", "1")],
        )
        .unwrap();
        assert_eq!(
            s,
            "LOCATION 's3://b/c.jsonl' -- 5 $x ${KEEP} ${not a name} s3://b/c.jsonl"
        );
        assert_eq!(unused, vec!["EXTRA".to_string()]);
        // A value wins over the default; an unclosed ${ is left alone.
        let (s, _) = sub("${N:-5} ${open", &[("N", "7")]).unwrap();
        assert_eq!(s, "7 ${open");
    }

    #[test]
    fn a_missing_value_names_the_variable() {
        let e = sub("SELECT ${LIMIT_ROWS}", &[]).unwrap_err();
        assert!(
            e.contains("${LIMIT_ROWS}") && e.contains("--set LIMIT_ROWS=VALUE"),
            "{e}"
        );
    }

    #[test]
    fn set_syntax() {
        assert!(parse_sets(&["A=1=2".into()]).unwrap()["A"] == "1=2");
        assert!(parse_sets(&["1A=x".into()]).is_err());
        assert!(parse_sets(&["A".into()]).is_err());
        assert!(parse_sets(&["A=".into()]).unwrap()["A"].is_empty());
    }
}
