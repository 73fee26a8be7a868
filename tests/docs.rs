//! The documentation's examples, run: every fenced block of `README.md` and `docs/*.md` is
//! checked against the code, so that docs and code cannot drift apart.
//!
//! # The fence convention
//!
//! A fence's info string says what the block is, and decides how it is checked:
//!
//! | info string | the block is | checked by |
//! |---|---|---|
//! | `toml function` | a complete `udfs/*.toml` file | `FunctionDef::parse`; it also joins the file's SQL session |
//! | `toml config` | a complete `sluice.toml` | `Config::parse` (every key real, every value valid) |
//! | `toml config-part` | a part of a `sluice.toml` (a `[models.x]` or `[execution]` table, ...) | merged into a minimal config, then `Config::parse`; a `[models.x]` table without `kind` is an OpenAI model, one without `model` gets a model id |
//! | `sql` | statements | explained in order (`Engine::explain_script`, as `sluice explain` does), in one session per file |
//! | `sql parse` | statements that need what the test has not (a bucket, a CSV file) | parsed by DataFusion's SQL parser only; keep these rare, and say why in a comment |
//! | `sh` | shell commands | every `sluice ...` command parses with the real command line (clap) |
//! | `json` | JSON | parses as JSON |
//! | `python` | Python using the `sluice` package | parses as Python (`python3`); `python/tests/test_docs.py` runs each file's blocks in order against the test server |
//! | `text` | output, messages, anything else | not checked |
//!
//! Anything else — a bare fence, a bare `toml`, an unknown language or role — is an error, so
//! that no example escapes the check.
//!
//! **The SQL session of a file.** Its functions are the repository's `udfs/` plus the file's
//! `toml function` blocks (a block replaces a repository function of the same name; two blocks
//! of one file may not define the same name). Its models are the test server's `default`
//! (chat) and `embedder` (embeddings), plus every other model named in the file's `toml config`
//! and `toml config-part` blocks, pointed at the test server (a local model becomes a chat model
//! there). Its tables are what the file's earlier `sql` blocks created: a `CREATE EXTERNAL
//! TABLE` reads real files (`data/transcripts/`), from the repository's root. Explain calls no
//! model: the test server must see no request.
//!
//! Every problem is reported as `FILE:LINE: ...`, the line of the block's opening fence (for a
//! SQL statement, the statement's own line).
//!
//! The checker is tested on a deliberately broken document (`a_broken_example_is_reported...`):
//! each kind of broken block must be reported, with its file and line.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sluice::config::{Config, ModelConfig, ModelPart};
use sluice::udf::def::FunctionDef;
use support::{MockConfig, MockServer, config_text, mock, repo};

/// The README's hard size limit, in bytes.
const README_MAX_BYTES: u64 = 12_288;

/// One fenced block of a Markdown file.
#[derive(Debug, Clone)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    /// The info string, trimmed (`toml function`).
    info: String,
    /// The block's text, without the fences.
    text: String,
}

/// The fenced blocks of `md`, or the problem that stops reading them (an unclosed fence).
fn blocks(file: &str, md: &str) -> Result<Vec<Block>, String> {
    let mut out = Vec::new();
    let mut open: Option<(Block, usize, usize)> = None; // block, indent, backticks
    for (i, line) in md.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let ticks = trimmed.chars().take_while(|c| *c == '`').count();
        match &mut open {
            None if ticks >= 3 => {
                let block = Block {
                    line: i + 1,
                    info: trimmed[ticks..].trim().to_string(),
                    text: String::new(),
                };
                open = Some((block, indent, ticks));
            }
            None => {}
            Some((_, _, n)) if ticks >= *n && trimmed[ticks..].trim().is_empty() => {
                out.push(open.take().map(|(b, _, _)| b).expect("an open block"));
            }
            Some((block, indent, _)) => {
                let strip = line.len() - line.trim_start().len();
                block.text.push_str(&line[strip.min(*indent)..]);
                block.text.push('\n');
            }
        }
    }
    match open {
        Some((b, _, _)) => Err(format!("{file}:{}: the fence is never closed", b.line)),
        None => Ok(out),
    }
}

/// What a fence's info string asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Function,
    Config,
    ConfigPart,
    Sql,
    SqlParse,
    Shell,
    Json,
    Python,
    Text,
}

fn role(info: &str) -> Result<Role, String> {
    let words: Vec<&str> = info.split_whitespace().collect();
    Ok(match words.as_slice() {
        ["toml", "function"] => Role::Function,
        ["toml", "config"] => Role::Config,
        ["toml", "config-part"] => Role::ConfigPart,
        ["sql"] => Role::Sql,
        ["sql", "parse"] => Role::SqlParse,
        ["sh"] => Role::Shell,
        ["json"] => Role::Json,
        ["python"] => Role::Python,
        ["text"] => Role::Text,
        ["toml"] => {
            return Err(
                "a toml block needs a role: ```toml function, ```toml config or \
                 ```toml config-part"
                    .into(),
            );
        }
        [] => return Err("a fence needs a language (```sql, ```toml config, ```text, ...)".into()),
        _ => {
            return Err(format!(
                "unknown fence {info:?}: use toml function|config|config-part, sql, sql parse, \
                 sh, json, python or text (see tests/docs.rs)"
            ));
        }
    })
}

/// API keys for `api_key_env`: any variable is set.
fn any_key(_: &str) -> Option<String> {
    // Long enough to pass for a cluster token too.
    Some("sk-docs-test-0123456789".to_string())
}

/// A `toml config-part` block as a complete `sluice.toml`: a model table without `kind` is an
/// OpenAI chat model on a placeholder URL, one without `model` gets a model id.
fn complete_part(text: &str) -> Result<String, String> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    if let Some(toml::Value::Table(models)) = table.get_mut("models") {
        for (_, model) in models.iter_mut() {
            let toml::Value::Table(m) = model else {
                continue;
            };
            if !m.contains_key("kind") {
                m.insert("kind".into(), "openai".into());
                m.entry("base_url")
                    .or_insert("http://127.0.0.1:9/v1".into());
            }
            m.entry("model").or_insert("docs-model".into());
        }
    }
    toml::to_string(&table).map_err(|e| e.to_string())
}

/// Checks one TOML block; returns the configuration it defines, if it is one.
fn check_toml(block: &Block, role: Role, at: &str) -> Result<Option<Config>, String> {
    let path = Path::new(at);
    match role {
        Role::Function => FunctionDef::parse(&block.text, path)
            .map(|_| None)
            .map_err(|e| format!("toml function: {e}")),
        Role::Config => Config::parse(&block.text, path, &any_key)
            .map(Some)
            .map_err(|e| format!("toml config: {e}")),
        _ => {
            let text = complete_part(&block.text).map_err(|e| format!("toml config-part: {e}"))?;
            Config::parse(&text, path, &any_key)
                .map(Some)
                .map_err(|e| format!("toml config-part: {e}"))
        }
    }
}

/// The commands of a shell block, split into words as a shell would (quotes, backslashes, line
/// continuations); comments, redirections and their targets are left out.
fn shell_commands(text: &str) -> Vec<Vec<String>> {
    let mut commands = vec![Vec::new()];
    let mut word: Option<String> = None;
    let mut skip_next = false;
    let mut chars = text.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') if matches!(chars.peek(), Some('$' | '"' | '\\' | '`')) => {
                word.get_or_insert_default()
                    .push(chars.next().unwrap_or('\\'));
            }
            (Some(_), c) => word.get_or_insert_default().push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_default();
            }
            (None, '\\') => match chars.next() {
                Some('\n') | None => {}
                Some(e) => word.get_or_insert_default().push(e),
            },
            (None, '#') if word.is_none() => {
                while chars.peek().is_some_and(|c| *c != '\n') {
                    chars.next();
                }
            }
            (None, c) if c.is_whitespace() || matches!(c, ';' | '|' | '&' | '<' | '>') => {
                if let Some(w) = word.take() {
                    if skip_next {
                        skip_next = false;
                    } else if let Some(cmd) = commands.last_mut() {
                        cmd.push(w);
                    }
                }
                if matches!(c, '<' | '>') {
                    skip_next = true;
                } else if matches!(c, '\n' | ';' | '|' | '&') {
                    commands.push(Vec::new());
                }
            }
            (None, c) => word.get_or_insert_default().push(c),
        }
    }
    if let (Some(w), false, Some(cmd)) = (word, skip_next, commands.last_mut()) {
        cmd.push(w);
    }
    commands
        .into_iter()
        .map(|cmd| {
            let env = |w: &String| {
                w.split_once('=').is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                })
            };
            cmd.into_iter().skip_while(env).collect::<Vec<_>>()
        })
        .filter(|cmd| cmd.first().is_some_and(|w| w == "sluice"))
        .collect()
}

/// Checks the `sluice` commands of a shell block with the real command line.
fn check_shell(block: &Block) -> Result<(), String> {
    use clap::Parser;
    for cmd in shell_commands(&block.text) {
        if let Err(e) = sluice::cli::Cli::try_parse_from(&cmd) {
            let first = e.to_string().lines().next().unwrap_or_default().to_string();
            return Err(format!("sh: `{}`: {first}", cmd.join(" ")));
        }
    }
    Ok(())
}

/// A Python block parses (with `python3`'s own parser; the Python tests run it).
fn check_python(block: &Block) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args(["-c", "import ast, sys; ast.parse(sys.stdin.read())"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("python: cannot run python3: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(block.text.as_bytes())
            .map_err(|e| format!("python: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("python: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(format!(
        "python: {}",
        err.lines().last().unwrap_or("does not parse")
    ))
}

/// Checks every block that needs no SQL session; returns the problems, the function blocks by
/// name and the models the file's configurations define.
fn check_static(
    file: &str,
    blocks: &[Block],
) -> (Vec<String>, BTreeMap<String, Block>, Vec<ModelConfig>) {
    let mut problems = Vec::new();
    let mut functions: BTreeMap<String, Block> = BTreeMap::new();
    let mut models = Vec::new();
    for block in blocks {
        let at = format!("{file}:{}", block.line);
        let role = match role(&block.info) {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("{at}: {e}"));
                continue;
            }
        };
        let result = match role {
            Role::Function | Role::Config | Role::ConfigPart => {
                check_toml(block, role, &at).map(|config| {
                    models.extend(config.into_iter().flat_map(|c| c.models.into_values()));
                })
            }
            Role::SqlParse => datafusion::sql::parser::DFParser::parse_sql(&block.text)
                .map(|_| ())
                .map_err(|e| format!("sql parse: {e}")),
            Role::Shell => check_shell(block),
            Role::Json => serde_json::from_str::<serde_json::Value>(&block.text)
                .map(|_| ())
                .map_err(|e| format!("json: {e}")),
            Role::Python => check_python(block),
            Role::Sql | Role::Text => Ok(()),
        };
        if let Err(e) = result {
            // Parse errors name the block already (`FILE:LINE: ...` as their path): once is enough.
            problems.push(format!("{at}: {}", e.replace(&format!("{at}: "), "")));
        } else if role == Role::Function {
            let name = function_name(&block.text);
            if let Some(prev) = functions.get(&name) {
                problems.push(format!(
                    "{at}: function {name:?} is already defined at {file}:{}",
                    prev.line
                ));
            } else {
                functions.insert(name, block.clone());
            }
        }
    }
    (problems, functions, models)
}

/// The `name` of a function definition that parsed.
fn function_name(text: &str) -> String {
    let table: toml::Table = toml::from_str(text).expect("a parsed definition is TOML");
    table["name"]
        .as_str()
        .expect("name is a string")
        .to_string()
}

/// The configuration of a file's SQL session: the test server's models, then the file's own.
fn session_config(server: &MockServer, doc_models: Vec<ModelConfig>, udf_dir: &Path) -> Config {
    let base = format!(
        "{}\n[models.embedder]\nkind = \"openai_embeddings\"\nbase_url = \"{}\"\n\
         model = \"mock-embed\"\n",
        config_text(&server.base_url(), 2, 4),
        server.base_url()
    );
    let mut config =
        Config::parse(&base, Path::new("sluice.toml"), &|_| None).expect("test config parses");
    config.udf_dir = udf_dir.to_path_buf();
    for mut m in doc_models {
        if config.models.contains_key(&m.name) {
            continue;
        }
        if matches!(m.part, ModelPart::Local(_)) {
            let name = m.name.clone();
            m = config.models["default"].clone();
            m.name = name;
        }
        if let ModelPart::Server(s) = &mut m.part {
            s.base_url = server.base_url();
            s.api_key = None;
            s.api_key_env = None;
        }
        config.models.insert(m.name.clone(), m);
    }
    config
}

/// Explains the file's `sql` blocks in order in one session; returns the problems.
async fn check_sql(
    file: &str,
    blocks: &[Block],
    functions: &BTreeMap<String, Block>,
    models: Vec<ModelConfig>,
) -> Vec<String> {
    let sql: Vec<&Block> = blocks
        .iter()
        .filter(|b| role(&b.info) == Ok(Role::Sql))
        .collect();
    if sql.is_empty() {
        return vec![];
    }
    let udfs = tempfile::tempdir().expect("tempdir");
    for e in std::fs::read_dir(repo().join("udfs"))
        .expect("udfs/")
        .flatten()
    {
        std::fs::copy(e.path(), udfs.path().join(e.file_name())).expect("copy a udf");
    }
    for (name, block) in functions {
        std::fs::write(udfs.path().join(format!("{name}.toml")), &block.text).expect("write");
    }
    let server = mock(MockConfig::default()).await;
    let config = session_config(&server, models, udfs.path());
    let engine = match sluice::Engine::for_estimates(&config) {
        Ok(e) => e,
        Err(e) => return vec![format!("{file}: the SQL session does not start: {e}")],
    };
    let mut problems = Vec::new();
    for block in sql {
        let origin = format!("{file}:{}", block.line);
        if let Err(e) = engine.explain_script(&block.text, &origin).await {
            problems.push(format!(
                "{file}:{}: sql (block at line {}), statement {} ({}): {}",
                block.line + e.line,
                block.line,
                e.index,
                e.summary,
                e.message
            ));
        }
    }
    assert_eq!(server.stats().requests, 0, "{file}: explain sent a request");
    problems
}

/// Every problem of one Markdown file's examples, each `FILE:LINE: ...`.
async fn check_markdown(file: &str, md: &str) -> Vec<String> {
    let blocks = match blocks(file, md) {
        Ok(b) => b,
        Err(e) => return vec![e],
    };
    let (mut problems, functions, models) = check_static(file, &blocks);
    problems.extend(check_sql(file, &blocks, &functions, models).await);
    problems
}

/// `README.md` and every `docs/*.md`, as (name relative to the repository, path).
fn user_docs() -> Vec<(String, PathBuf)> {
    let mut files = vec![("README.md".to_string(), repo().join("README.md"))];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    for p in docs {
        let name = format!("docs/{}", p.file_name().expect("a file").to_string_lossy());
        files.push((name, p));
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_of_the_docs_parses_and_plans() {
    let mut problems = Vec::new();
    for (name, path) in user_docs() {
        let md = std::fs::read_to_string(&path).expect("a readable doc");
        problems.extend(check_markdown(&name, &md).await);
    }
    assert!(
        problems.is_empty(),
        "{} broken example(s) in the docs:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn the_readme_fits_in_12_kib_and_names_the_test_command() {
    let path = repo().join("README.md");
    let bytes = std::fs::metadata(&path).expect("README.md").len();
    assert!(
        bytes <= README_MAX_BYTES,
        "README.md is {bytes} bytes, over {README_MAX_BYTES}: move detail to docs/"
    );
    let text = std::fs::read_to_string(&path).expect("README.md");
    assert!(
        text.contains("scripts/test.sh"),
        "README.md names scripts/test.sh"
    );
}

/// Words that belong to the project's history or to one machine, not to a user's docs.
const NOT_FOR_USERS: [&str; 6] = [
    "issue ",
    "issue#",
    "this machine",
    "this session",
    "not found yet",
    "2-core",
];

#[test]
fn user_docs_speak_of_the_product_not_its_history() {
    let mut found = Vec::new();
    for (name, path) in user_docs() {
        let md = std::fs::read_to_string(&path).expect("a readable doc");
        for (i, line) in md.lines().enumerate() {
            let lower = line.to_lowercase();
            for w in NOT_FOR_USERS {
                if lower.contains(w) {
                    found.push(format!("{name}:{}: {w:?}", i + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "history in user docs:\n{}",
        found.join("\n")
    );
}

/// The anchor GitHub gives a heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown file's headings (outside fences).
fn anchors(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_fence = false;
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
        } else if !in_fence && line.starts_with('#') {
            out.push(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// Relative links `[text](target)` of a Markdown file, with their lines.
fn links(md: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in md.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            let target = &after[..end];
            if !target.contains("://") && !target.starts_with("mailto:") {
                out.push((i + 1, target.to_string()));
            }
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn links_between_the_docs_lead_somewhere() {
    let mut broken = Vec::new();
    for (name, path) in user_docs() {
        let md = std::fs::read_to_string(&path).expect("a readable doc");
        let dir = path.parent().expect("a directory");
        for (line, target) in links(&md) {
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let file_path = if file.is_empty() {
                path.clone()
            } else {
                dir.join(file)
            };
            if !file_path.exists() {
                broken.push(format!("{name}:{line}: {target}: no such file"));
                continue;
            }
            if !anchor.is_empty() && file_path.extension().is_some_and(|x| x == "md") {
                let text = std::fs::read_to_string(&file_path).expect("a readable doc");
                if !anchors(&text).iter().any(|a| a == anchor) {
                    broken.push(format!("{name}:{line}: {target}: no such heading"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// A document with one good block of each kind and one broken block of each kind.
const BROKEN_DOC: &str = r#"# Broken

```toml function
name = "fine"
args = ["x"]
prompt = "Say {{ x }}"
```

```toml
name = "no_role"
```

```toml function
name = "typo"
args = ["x"]
promt = "{{ x }}"
```

```toml config
[execution]
rows_per_batch = 10
```

```toml config-part
[models.cheap]
concurrency = 0
```

```sql
CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 'data/transcripts/';
SELECT ticker, fine(ticker) AS f FROM t LIMIT 1;
```

```sql
SELECT ticker, no_such_function(ticker) FROM t;
```

```sql parse
SELEC 1;
```

```sh
sluice run q.sql --max-rows 5
sluice run q.sql --no-such-flag
```

```ruby
print("no")
```

```python
print("unclosed"
```
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_example_is_reported_with_its_file_and_line() {
    let problems = check_markdown("broken.md", BROKEN_DOC).await;
    let expect = [
        ("broken.md:9:", "needs a role"),
        ("broken.md:13:", "promt"),
        ("broken.md:19:", "rows_per_batch"),
        ("broken.md:24:", "concurrency"),
        ("broken.md:35:", "no_such_function"),
        ("broken.md:38:", "sql parse"),
        ("broken.md:42:", "--no-such-flag"),
        ("broken.md:47:", "unknown fence"),
        ("broken.md:51:", "python:"),
    ];
    for (at, says) in expect {
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(at) && p.contains(says)),
            "expected a problem at {at} saying {says:?}; got:\n{}",
            problems.join("\n")
        );
    }
    assert_eq!(
        problems.len(),
        expect.len(),
        "the good blocks pass; got:\n{}",
        problems.join("\n")
    );
    let unclosed = check_markdown("open.md", "text\n\n```sql\nSELECT 1;\n").await;
    assert_eq!(unclosed, ["open.md:3: the fence is never closed"]);
}

#[test]
fn shell_commands_are_split_as_a_shell_would() {
    let cmds = shell_commands(
        "KEY=1 sluice run -c \"SELECT '\\${X}'\n  FROM t\" --set X=1 > out.csv  # note\n\
         ls | sluice sql\nsluice explain q.sql \\\n  --no-plan\n",
    );
    assert_eq!(
        cmds,
        [
            vec![
                "sluice",
                "run",
                "-c",
                "SELECT '${X}'\n  FROM t",
                "--set",
                "X=1"
            ],
            vec!["sluice", "sql"],
            vec!["sluice", "explain", "q.sql", "--no-plan"],
        ]
    );
}
