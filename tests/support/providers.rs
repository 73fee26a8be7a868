//! What the tests of the hosted providers (`anthropic`, `gemini`, `azure_openai`, and their
//! batch modes) share: a configuration whose key is in one environment variable, the flagship
//! run to its rows or to its error, and the check that hostile answers are typed row errors.

use std::path::Path;

use datafusion::arrow::array::{Array, AsArray};
use sluice::Engine;
use sluice::config::Config;
use sluice::udf::def::FunctionDef;

use super::{
    MockConfig, MockServer, Project, flagship_engine, flagship_sql, mock, project_flagship_sql,
    read_parquet, repo, run, shared_data, sorted_rows,
};

/// A function answering an object for each row, its text capped at 80 characters.
pub const SHORT_PROFILE: &str = r#"
name = "profile"
args = ["x"]
prompt = "Describe {{ x }}"
max_tokens = 50
output = { type = "object", properties = { a = { type = "string", maxLength = 80 }, b = { type = "integer" } }, required = ["a", "b"] }
"#;

/// The server's root URL (no `/v1`), as the hosted providers' `base_url` names it.
pub fn root(server: &MockServer) -> String {
    format!("http://{}", server.addr())
}

/// `cfg` with the server requiring `key`.
pub fn keyed(key: &str, cfg: MockConfig) -> MockConfig {
    MockConfig {
        api_key: Some(key.into()),
        ..cfg
    }
}

/// The flagship's configuration text with `[models.default]` of `kind` and `model` at
/// `base_url`: `concurrency` requests in flight, 8 attempts with fast backoff, no cache,
/// `extra` keys appended to the model.
pub fn hosted_text(
    kind: &str,
    base_url: &str,
    model: &str,
    concurrency: usize,
    extra: &str,
) -> String {
    format!(
        "[dispatcher]\nconcurrency = {concurrency}\nmax_attempts = 8\nbackoff_base_ms = 1\n\
         backoff_max_ms = 20\n[cache]\nenabled = false\n[models.default]\nkind = \"{kind}\"\n\
         base_url = \"{base_url}\"\nmodel = \"{model}\"\ntimeout_ms = 5000\n{extra}"
    )
}

/// A configuration's text for an in-process engine: 4 requests in flight, `attempts` attempts
/// with fast backoff, the cache in `cache`, and `model` (a `[models.default]` table's text).
pub fn cached_config_text(attempts: u32, cache: &Path, model: &str) -> String {
    format!(
        "[dispatcher]\nconcurrency = 4\nmax_attempts = {attempts}\nbackoff_base_ms = 1\n\
         backoff_max_ms = 20\n[cache]\nenabled = true\ndir = \"{}\"\n{model}",
        cache.display()
    )
}

/// `text` parsed with `key` in the environment variable `var` (and no other), functions read
/// from the repository's `udfs/`.
pub fn parse_with_key(text: &str, var: &str, key: &str) -> Config {
    let env = |k: &str| (k == var).then(|| key.to_string());
    let mut cfg = Config::parse(text, Path::new("sluice.toml"), &env).expect("parses");
    cfg.udf_dir = repo().join("udfs");
    cfg
}

/// A project running the flagship as `q.sql` at `server` with `model` (a `[models.default]`
/// table's text) as its model, the cache on.
pub fn project_with_model(server: &MockServer, model: &str) -> Project {
    let p = Project::new(&server.base_url(), 8, true);
    let cfg = std::fs::read_to_string(p.path("sluice.toml")).unwrap();
    let head = &cfg[..cfg.find("[models.default]").unwrap()];
    p.write("sluice.toml", &format!("{head}{model}"));
    p.write("q.sql", &project_flagship_sql("out/qa.parquet"));
    p
}

/// `sluice ARGS` in `p` with `key` in the environment variable `var`; (exit code, stdout,
/// stderr).
pub fn sluice_keyed(p: &Project, (var, key): (&str, &str), args: &[&str]) -> (i32, String, String) {
    let out = tokio::task::block_in_place(|| p.command(args).env(var, key).output())
        .expect("sluice runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

/// Runs the flagship; its sorted rows.
pub async fn flagship_rows(engine: &Engine) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qa.parquet");
    let sql = flagship_sql(&shared_data("earnings_transcript_excerpts.jsonl"), &out);
    run(engine, &sql).await.expect("the flagship runs");
    sorted_rows(&read_parquet(&out).await)
}

/// The flagship's rows on kind `openai` against a fresh fault-free server: what every
/// provider must write.
pub async fn openai_rows() -> Vec<String> {
    let s = mock(MockConfig::default()).await;
    flagship_rows(&flagship_engine(&s, 8)).await
}

/// Runs the flagship, which must fail; its error.
pub async fn flagship_error(engine: &Engine) -> String {
    let dir = tempfile::tempdir().unwrap();
    let sql = flagship_sql(
        &shared_data("earnings_transcript_excerpts.jsonl"),
        &dir.path().join("qa.parquet"),
    );
    run(engine, &sql).await.expect_err("the flagship fails")
}

/// Runs `profile` (its definition `profile`, an object with an integer `b`) over one row per
/// `(marker, error kind)` of `cases` and one clean row: each marked row is an error of its
/// kind whose message does not hold `key`, the clean row a value; no row is lost. The engine
/// that ran it.
pub async fn check_typed_row_errors(
    cfg: &Config,
    profile: &str,
    cases: &[(&str, &str)],
    key: &str,
) -> Engine {
    let def = FunctionDef::parse(profile, Path::new("profile.toml")).unwrap();
    let engine = Engine::with_functions(cfg, vec![def]).unwrap();
    let values: Vec<String> = (cases.iter())
        .map(|(m, _)| format!("('{m}')"))
        .chain(["('fine')".to_string()])
        .collect();
    let sql = format!(
        "CREATE TABLE t AS VALUES {};\nCREATE TABLE r AS SELECT column1 AS x, profile(column1) \
         AS v, profile_error(column1) AS e FROM t;",
        values.join(", ")
    );
    run(&engine, &sql).await.unwrap();
    let batches = engine
        .query("SELECT x, e['kind'] AS kind, e['message'] AS message, v['b'] AS b FROM r")
        .await
        .unwrap();
    let mut seen = 0;
    for b in &batches {
        let (x, kind, message) = (
            b.column(0).as_string::<i32>(),
            b.column(1).as_string::<i32>(),
            b.column(2).as_string::<i32>(),
        );
        for i in 0..b.num_rows() {
            seen += 1;
            match cases.iter().find(|(m, _)| *m == x.value(i)) {
                Some((m, expected)) => {
                    assert_eq!(kind.value(i), *expected, "{m}: {}", message.value(i));
                    assert!(!message.value(i).contains(key));
                }
                None => assert!(kind.is_null(i) && b.column(3).is_valid(i), "the clean row"),
            }
        }
    }
    assert_eq!(seen, cases.len() + 1, "no row lost");
    engine
}
