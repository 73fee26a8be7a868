//! Semantic operators over real HTTP against the test server: many rows per prompt
//! (`rows_per_prompt`).

mod support;

use std::path::Path;

use sluice::Engine;
use sluice::config::Config;
use sluice::udf::def::FunctionDef;
use support::mock_llm::{DEFAULT_DIM, embedding_of};
use support::*;

/// Labels a passage; packs up to 10 rows per request (the test server finds the items by their
/// `### Item k` lines and answers each with its own hash).
const TOPIC_FN: &str = r#"
name = "topic"
args = ["passage"]
rows_per_prompt = 10
item = "{{ passage }}"
system = "You label passages of earnings calls."
prompt = """Give a one-line topic for each of these {{ n }} passages, in order.
{% for item in items %}### Item {{ loop.index }}
{{ item }}
{% endfor %}"""
output = { type = "string" }
"#;

/// An engine on `server` with `defs`, `attempts` attempts per row, and the cache in `cache`
/// when given.
fn engine(server: &MockServer, defs: &[&str], attempts: u32, cache: Option<&Path>) -> Engine {
    let mut text = config_text(&server.base_url(), attempts, 16);
    if let Some(dir) = cache {
        text = text.replace(
            "[cache]\nenabled = false",
            &format!(
                "[cache]\nenabled = true\ndir = {:?}",
                dir.display().to_string()
            ),
        );
    }
    let cfg = Config::parse(&text, Path::new("sluice.toml"), &|_| None).unwrap();
    let defs = defs
        .iter()
        .map(|t| FunctionDef::parse(t, Path::new("test.toml")).expect("definition parses"))
        .collect();
    Engine::with_functions(&cfg, defs).expect("engine starts")
}

/// A configuration on `server` whose only function is `udf`, written into `dir`.
fn config_with_function(server: &MockServer, dir: &Path, udf: &str) -> Config {
    std::fs::write(dir.join("f.toml"), udf).unwrap();
    let mut cfg = Config::parse(
        &config_text(&server.base_url(), 2, 16),
        Path::new("sluice.toml"),
        &|_| None,
    )
    .unwrap();
    cfg.udf_dir = dir.to_path_buf();
    cfg
}

/// `SELECT p, topic(p)` over `n` distinct passages.
fn topics_sql(n: usize) -> String {
    format!(
        "SELECT arrow_cast(p, 'Utf8') AS p, topic(p) AS t, topic_error(p) AS e FROM \
         (SELECT 'Passage ' || CAST(value AS VARCHAR) || ': revenue grew.' AS p \
          FROM generate_series(1, {n})) ORDER BY p"
    )
}

/// (passage, topic) rows; every topic must carry its own passage's hash or be NULL with a
/// typed error.
async fn topics(e: &Engine, n: usize) -> (usize, usize) {
    let batches = e.query(&topics_sql(n)).await.unwrap();
    let passages = strings(&batches, "p");
    let values = strings(&batches, "t");
    let errors = error_kinds(&batches, "e");
    assert_eq!(passages.len(), n, "one row per passage");
    let mut ok = 0;
    for ((p, v), err) in passages.iter().zip(&values).zip(&errors) {
        let p = p.as_deref().unwrap();
        match v {
            Some(v) => {
                let tag = format!("[{}]", prompt_hash(None, p));
                assert!(
                    v.contains(&tag),
                    "{p:?} got {v:?}, not its own answer {tag}"
                );
                ok += 1;
            }
            None => assert!(err.is_some(), "{p:?}: NULL without a typed error"),
        }
    }
    (ok, n - ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_rows_per_prompt_make_a_tenth_of_the_requests() {
    let s = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&s, &[TOPIC_FN], 2, Some(dir.path()));
    let (ok, failed) = topics(&e, 100).await;
    assert_eq!((ok, failed), (100, 0));
    assert_eq!(s.stats().requests, 10, "100 rows, 10 per request");
    assert_eq!(s.stats().prompts, 10);
    e.flush_cache().await.unwrap();
    drop(e);

    // Each row is cached under its own key: 5 per request, or none packed, finds them all.
    s.reset_stats();
    let five = TOPIC_FN.replace("rows_per_prompt = 10", "rows_per_prompt = 5");
    let e = engine(&s, &[&five], 2, Some(dir.path()));
    assert_eq!(topics(&e, 100).await, (100, 0));
    assert_eq!(
        s.stats().requests,
        0,
        "a re-run with another N is all cache hits"
    );
    drop(e);
    let one = TOPIC_FN.replace("rows_per_prompt = 10", "rows_per_prompt = 1");
    let e = engine(&s, &[&one], 2, Some(dir.path()));
    assert_eq!(topics(&e, 120).await, (120, 0));
    assert_eq!(
        s.stats().requests,
        20,
        "only the 20 new rows, one per request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_with_the_wrong_item_count_are_split_never_misaligned() {
    let s = mock(MockConfig {
        faults: FaultRates {
            wrong_count: 0.1,
            invalid_schema: 0.05,
            server_500: 0.05,
            ..FaultRates::default()
        },
        seed: 7,
        ..MockConfig::default()
    })
    .await;
    let e = engine(&s, &[TOPIC_FN], 6, None);
    let (ok, failed) = topics(&e, 100).await;
    assert_eq!(ok + failed, 100, "no row lost");
    assert!(ok >= 95, "{ok} answered, {failed} typed errors");
    let st = s.stats();
    assert!(
        st.faults.get("wrong_count").copied().unwrap_or(0) > 0,
        "{:?}",
        st.faults
    );
    assert!(
        st.requests > 10,
        "split requests were sent: {}",
        st.requests
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_counts_the_packed_requests() {
    let s = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with_function(&s, dir.path(), TOPIC_FN);
    let e = Engine::for_estimates(&cfg).unwrap();
    let x = e.explain_script(&topics_sql(95), "q.sql").await.unwrap();
    let t = &x.totals[0];
    assert_eq!((t.calls, t.requests), (95, 10), "{t:?}");
    assert!(
        x.to_text(false)
            .contains("10 rows per prompt: 85 requests saved"),
        "{}",
        x.to_text(false)
    );
    assert_eq!(s.stats().requests, 0);
}

#[test]
fn functions_that_cannot_be_packed_are_refused_at_load_time() {
    let load = |t: &str| {
        FunctionDef::parse(t, Path::new("f.toml"))
            .unwrap_err()
            .to_string()
    };
    let uses_arg = TOPIC_FN.replace("Give a one-line topic", "About {{ passage }}: give a topic");
    assert!(
        load(&uses_arg).contains("cannot be packed"),
        "{}",
        load(&uses_arg)
    );
    let no_items = TOPIC_FN.replace("{% for item in items %}", "{% for item in [] %}");
    assert!(load(&no_items).contains("must list"), "{}", load(&no_items));
    let no_item = TOPIC_FN.replace("item = \"{{ passage }}\"\n", "");
    assert!(
        load(&no_item).contains("rows_per_prompt needs item"),
        "{}",
        load(&no_item)
    );
    let stray = TOPIC_FN.replace("rows_per_prompt = 10\n", "");
    assert!(
        load(&stray).contains("set rows_per_prompt"),
        "{}",
        load(&stray)
    );
}

/// An embedding of a passage, on the embeddings model.
const EMBED_FN: &str = r#"
name = "embed"
kind = "embedding"
args = ["text"]
model = "embedder"
dim = 16
prompt = "{{ text }}"
"#;

/// An engine whose `embedder` model is `server`'s embeddings endpoint, 8 inputs per request.
fn embedding_engine(server: &MockServer, defs: &[&str]) -> Result<Engine, String> {
    let text = format!(
        "{}\n[models.embedder]\nkind = \"openai_embeddings\"\nbase_url = \"{}\"\n\
         model = \"emb\"\nprompts_per_request = 8\nconcurrency = 1\n",
        config_text(&server.base_url(), 3, 16),
        server.base_url()
    );
    let cfg = Config::parse(&text, Path::new("sluice.toml"), &|_| None).unwrap();
    let defs = defs
        .iter()
        .map(|t| FunctionDef::parse(t, Path::new("embed.toml")).expect("definition parses"))
        .collect();
    Engine::with_functions(&cfg, defs).map_err(|e| e.to_string())
}

fn passages_sql(n: usize) -> String {
    format!(
        "SELECT arrow_cast('Passage ' || CAST(value AS VARCHAR) || ': margins rose.', 'Utf8') AS p \
         FROM generate_series(1, {n})"
    )
}

/// The Python with DuckDB that `scripts/test.sh` installs (`.venv-moto`), or
/// `$SLUICE_DUCKDB_PYTHON`.
fn duckdb_python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_DUCKDB_PYTHON") {
        return p.into();
    }
    let p = repo().join(".venv-moto/bin/python");
    assert!(
        p.exists(),
        "{} not found: run scripts/test.sh (it installs duckdb there) or set SLUICE_DUCKDB_PYTHON",
        p.display()
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_land_as_float32_vectors_that_duckdb_reads_back() {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{DataType, Float32Type};
    let s = mock(MockConfig::default()).await;
    let e = embedding_engine(&s, &[EMBED_FN]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("v.parquet");
    let sql = format!(
        "COPY (SELECT p, embed(p) AS v FROM ({})) TO '{}' STORED AS PARQUET",
        passages_sql(40),
        out.display()
    );
    run(&e, &sql).await.unwrap();
    let st = s.stats();
    assert_eq!(st.prompts, 40, "one input per row");
    assert!(
        st.requests <= 7,
        "8 inputs per request: {} requests",
        st.requests
    );

    let batches = read_parquet(&out).await;
    let col = batches[0].column_by_name("v").unwrap();
    assert!(
        matches!(col.data_type(), DataType::FixedSizeList(f, 16) if f.data_type() == &DataType::Float32),
        "{}",
        col.data_type()
    );
    let passages = strings(&batches, "p");
    let mut seen = 0;
    for b in &batches {
        let v = b.column_by_name("v").unwrap().as_fixed_size_list();
        let p = b.column_by_name("p").unwrap();
        let p = datafusion::arrow::compute::cast(p, &DataType::Utf8).unwrap();
        for i in 0..b.num_rows() {
            let got = v.value(i);
            let got = got.as_primitive::<Float32Type>().values().to_vec();
            assert_eq!(
                got,
                embedding_of(p.as_string::<i32>().value(i), DEFAULT_DIM)
            );
            seen += 1;
        }
    }
    assert_eq!(seen, passages.len());

    // Ours against DuckDB's list_cosine_similarity and list_distance, over the Parquet file.
    let ours_sql = format!(
        "CREATE EXTERNAL TABLE v STORED AS PARQUET LOCATION '{}';",
        out.display()
    );
    run(&e, &ours_sql).await.unwrap();
    let ours = e
        .query(
            "SELECT arrow_cast(a.p, 'Utf8') AS p, cosine_similarity(a.v, b.v) AS c, \
             l2_distance(a.v, b.v) AS d FROM v a, v b \
             WHERE b.p = 'Passage 1: margins rose.' ORDER BY c DESC, p LIMIT 40",
        )
        .await
        .unwrap();
    let script = format!(
        "import duckdb\n\
         rows = duckdb.sql(\"SELECT a.p, list_cosine_similarity(a.v, b.v), list_distance(a.v, b.v) \
         FROM '{0}' a, '{0}' b WHERE b.p = 'Passage 1: margins rose.'\").fetchall()\n\
         for p, c, d in rows: print(p, repr(c), repr(d), sep='\\t')\n",
        out.display()
    );
    let py = std::process::Command::new(duckdb_python())
        .args(["-c", &script])
        .output()
        .expect("python runs");
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let duck: std::collections::HashMap<String, (f64, f64)> = String::from_utf8_lossy(&py.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (
                f[0].to_string(),
                (f[1].parse().unwrap(), f[2].parse().unwrap()),
            )
        })
        .collect();
    assert_eq!(duck.len(), 40);
    let mut compared = 0;
    for b in &ours {
        let p = b.column_by_name("p").unwrap().as_string::<i32>();
        let c = b
            .column_by_name("c")
            .unwrap()
            .as_primitive::<datafusion::arrow::datatypes::Float64Type>();
        let d = b
            .column_by_name("d")
            .unwrap()
            .as_primitive::<datafusion::arrow::datatypes::Float64Type>();
        for i in 0..b.num_rows() {
            let (dc, dd) = duck[p.value(i)];
            assert!(
                (c.value(i) - dc).abs() < 1e-6,
                "{}: cosine {} vs DuckDB {dc}",
                p.value(i),
                c.value(i)
            );
            assert!(
                (d.value(i) - dd).abs() < 1e-6,
                "{}: l2 {} vs DuckDB {dd}",
                p.value(i),
                d.value(i)
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedding_functions_need_an_embeddings_model() {
    let s = mock(MockConfig::default()).await;
    let on_chat = EMBED_FN.replace("model = \"embedder\"", "model = \"default\"");
    let e = embedding_engine(&s, &[&on_chat]).unwrap_err();
    assert!(
        e.contains("has no embeddings endpoint") && e.contains("openai_embeddings"),
        "{e}"
    );
    let chat_on_embedder = PROFILE_FN.replace("prompt =", "model = \"embedder\"\nprompt =");
    let e = embedding_engine(&s, &[&chat_on_embedder]).unwrap_err();
    assert!(e.contains("serves embeddings"), "{e}");
    let load = |t: &str| {
        FunctionDef::parse(t, Path::new("f.toml"))
            .unwrap_err()
            .to_string()
    };
    assert!(load(&EMBED_FN.replace("dim = 16\n", "")).contains("dim"));
    let with_output = format!("{EMBED_FN}output = {{ type = \"string\" }}\n");
    assert!(load(&with_output).contains("leave output out"));
    let e = embedding_engine(&s, &[EMBED_FN]).unwrap();
    let err = e
        .query("SELECT cosine_similarity(embed('a'), 'not a vector')")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("takes two vectors"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_similar_passages_query_embeds_each_passage_and_question_once() {
    let s = mock(MockConfig::default()).await;
    let p = Project::new(&s.base_url(), 8, false);
    std::fs::copy(repo().join("udfs/embed.toml"), p.path("udfs/embed.toml")).unwrap();
    let embed = std::fs::read_to_string(p.path("udfs/embed.toml")).unwrap();
    p.write("udfs/embed.toml", &embed.replace("dim = 1536", "dim = 16"));
    let cfg = std::fs::read_to_string(p.path("sluice.toml")).unwrap();
    p.write(
        "sluice.toml",
        &format!(
            "{cfg}\n[models.embedder]\nkind = \"openai_embeddings\"\nbase_url = \"{}\"\n\
             model = \"emb\"\n",
            s.base_url()
        ),
    );
    let (code, _, err) = p.run_args(&[
        "gen-corpus",
        "--out",
        "data/c.jsonl",
        "--companies",
        "3",
        "--quarters",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    std::fs::remove_file(p.path("data/t.jsonl")).unwrap();
    let sql = std::fs::read_to_string(repo().join("queries/similar_passages.sql"))
        .unwrap()
        .replace("'data/transcripts/'", "'data/'");
    p.write("q.sql", &sql);
    let (code, stdout, err) =
        tokio::task::block_in_place(|| p.run_args(&["run", "q.sql", "--metrics-json", "m.json"]));
    assert_eq!(code, 0, "{stdout}\n{err}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.path("m.json")).unwrap()).unwrap();
    let prompts = |f: &str| m["functions"][f]["prompts"].as_u64().unwrap();
    // 6 transcripts of one passage each, 3 questions per passage.
    assert_eq!(prompts("generate_questions"), 6);
    assert_eq!(
        prompts("embed"),
        6 + 18,
        "each passage and each question once"
    );
    assert!(
        stdout.contains("COPY 90 rows"),
        "five neighbours for each of 18 questions: {stdout}"
    );
}

/// A yes/no over two texts (the test server answers each pair by its prompt's hash).
const SAME_FN: &str = r#"
name = "same_topic"
args = ["a", "b"]
prompt = "Do these two passages discuss the same topic? A: {{ a }} B: {{ b }}"
output = { type = "boolean" }
"#;

const JOIN_TABLES: &str = "CREATE TABLE a AS SELECT value AS k, \
     arrow_cast('left ' || CAST(value AS VARCHAR), 'Utf8') AS x FROM generate_series(1, 6);\n\
     CREATE TABLE b AS SELECT value % 3 AS k, \
     arrow_cast('right ' || CAST(value AS VARCHAR), 'Utf8') AS y FROM generate_series(1, 9);\n";

async fn pairs(e: &Engine, sql: &str) -> Vec<String> {
    sorted_rows(&e.query(sql).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_llm_join_condition_calls_once_per_pair_its_equality_keeps() {
    let s = mock(MockConfig::default()).await;
    let e = engine(&s, &[SAME_FN], 2, None);
    run(&e, JOIN_TABLES).await.unwrap();
    let joined = pairs(
        &e,
        "SELECT a.x, b.y FROM a JOIN b ON a.k = b.k AND same_topic(a.x, b.y)",
    )
    .await;
    // a.k = b.k keeps 6 pairs (b.k is 1 and 2 three times each): one call each.
    assert_eq!(s.stats().requests, 6);
    s.reset_stats();
    let explicit = pairs(
        &e,
        "SELECT x, y FROM (SELECT a.x, b.y, same_topic(a.x, b.y) AS same \
         FROM a JOIN b ON a.k = b.k) WHERE same",
    )
    .await;
    assert_eq!(
        joined, explicit,
        "the condition is the call over the kept pairs"
    );
    assert!(!joined.is_empty() && joined.len() < 6, "{joined:?}");

    // A pure LLM condition: every pair, once; a WHERE over a cross join is the same join.
    s.reset_stats();
    let pure = pairs(&e, "SELECT a.x, b.y FROM a JOIN b ON same_topic(a.x, b.y)").await;
    // 6 x 9 pairs, one call each; the 6 asked above are shared within the run.
    assert_eq!(s.stats().requests, 54 - 6);
    let cross = pairs(&e, "SELECT a.x, b.y FROM a, b WHERE same_topic(a.x, b.y)").await;
    assert_eq!(pure, cross);
    assert_eq!(
        s.stats().requests,
        54 - 6,
        "the cross join shares the join's calls"
    );

    let err = e
        .query("SELECT a.x FROM a LEFT JOIN b ON a.k = b.k AND same_topic(a.x, b.y)")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("only INNER JOIN"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_over_max_join_calls_is_refused_before_any_call() {
    let s = mock(MockConfig::default()).await;
    let p = Project::new(&s.base_url(), 8, false);
    p.write("udfs/same_topic.toml", SAME_FN);
    let cfg = std::fs::read_to_string(p.path("sluice.toml")).unwrap();
    p.write(
        "sluice.toml",
        &format!("[execution]\nmax_join_calls = 20\n{cfg}"),
    );
    let sql = format!("{JOIN_TABLES}SELECT a.x, b.y FROM a JOIN b ON same_topic(a.x, b.y);");
    let (code, _, err) = tokio::task::block_in_place(|| p.run_args(&["run", "-c", &sql]));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("54 LLM calls") && err.contains("max_join_calls = 20"),
        "{err}"
    );
    assert_eq!(s.stats().requests, 0, "refused before any call");
    // Within the limit it runs.
    let kept = format!(
        "{JOIN_TABLES}SELECT a.x, b.y FROM a JOIN b ON a.k = b.k AND same_topic(a.x, b.y);"
    );
    let (code, _, err) = tokio::task::block_in_place(|| p.run_args(&["run", "-c", &kept]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(s.stats().requests, 6);
}

/// A summary of a call from all of its passages, in order.
const SUMMARY_FN: &str = r#"
name = "summarize_call"
kind = "aggregate"
args = ["passages"]
prompt = """Summarise this call from its passages, in order.
{% for p in passages %}[{{ loop.index }}] {{ p }}
{% endfor %}"""
"#;

/// The prompt SUMMARY_FN renders for `passages`.
fn summary_prompt(passages: &[String]) -> String {
    let mut s = "Summarise this call from its passages, in order.\n".to_string();
    for (i, p) in passages.iter().enumerate() {
        s.push_str(&format!("[{}] {p}\n", i + 1));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_sees_every_value_of_its_group_in_order() {
    let s = mock(MockConfig::default()).await;
    let e = engine(&s, &[SUMMARY_FN], 2, None);
    let data = shared_data("earnings_transcript_excerpts.jsonl");
    run(
        &e,
        &format!(
            "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION '{}';\n\
             CREATE VIEW p AS SELECT ticker, arrow_cast(substr(transcript, 1, 80), 'Utf8') AS passage, \
             row_number() OVER (ORDER BY date, transcript) AS idx FROM t;\n\
             CREATE VIEW summaries AS SELECT ticker, summarize_call(passage ORDER BY idx DESC) AS s, \
             summarize_call_error(passage ORDER BY idx DESC) AS err, count(*) AS n \
             FROM p GROUP BY ticker HAVING count(*) > 1;",
            data.display()
        ),
    )
    .await
    .unwrap();
    let got = e.query("SELECT ticker, s, n FROM summaries").await.unwrap();
    let summaries = strings(&got, "s");
    assert_eq!(summaries.len(), 1, "one row per group");
    assert_eq!(
        s.stats().requests,
        1,
        "one call per group (value and error share it)"
    );
    let passages = e
        .query("SELECT passage FROM p ORDER BY idx DESC")
        .await
        .unwrap();
    let passages: Vec<String> = strings(&passages, "passage")
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(passages.len(), 14);
    let tag = format!("[{}]", prompt_hash(None, &summary_prompt(&passages)));
    let summary = summaries[0].clone().unwrap();
    assert!(
        summary.contains(&tag),
        "every passage in order: {summary} lacks {tag}"
    );
}

/// SUMMARY_FN with a budget of `tokens` prompt tokens per call, folding partial summaries.
fn summary_within(tokens: u64) -> String {
    format!(
        "{SUMMARY_FN}max_input_tokens = {tokens}\nreduce = \"\"\"Combine these partial summaries.\n\
         {{% for p in partials %}}- {{{{ p }}}}\n{{% endfor %}}\"\"\"\n"
    )
}

/// The user prompts of one level of SUMMARY_FN's reduction, by sluice's greedy rule: a chunk
/// grows while its prompt fits `budget` tokens (o200k_base, chat framing: the model `mock`'s
/// tokenizer). `line(j, v)` is value `v` as the `j`-th line of its chunk.
fn level(
    values: &[String],
    header: &str,
    line: &dyn Fn(usize, &str) -> String,
    budget: u64,
) -> Vec<String> {
    let bpe = tiktoken_rs::o200k_base_singleton();
    let fits = |user: &str| bpe.encode_ordinary(user).len() as u64 + 7 <= budget;
    let render = |chunk: &[String]| -> String {
        let mut u = header.to_string();
        for (j, v) in chunk.iter().enumerate() {
            u.push_str(&line(j + 1, v));
        }
        u
    };
    let (mut prompts, mut chunk): (Vec<String>, Vec<String>) = (vec![], vec![]);
    for v in values {
        chunk.push(v.clone());
        if !fits(&render(&chunk)) && chunk.len() > 1 {
            let last = chunk.pop().unwrap();
            prompts.push(render(&chunk));
            chunk = vec![last];
        }
    }
    prompts.push(render(&chunk));
    prompts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_over_the_input_budget_is_reduced_in_levels_and_cached() {
    let toml = summary_within(60);
    let s = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&s, &[&toml], 2, Some(dir.path()));
    let data = shared_data("earnings_transcript_excerpts.jsonl");
    let sql = format!(
        "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION '{}';\n\
         CREATE VIEW p AS SELECT ticker, arrow_cast(substr(transcript, 1, 80), 'Utf8') AS passage, \
         row_number() OVER (ORDER BY date, transcript) AS idx FROM t;\n",
        data.display()
    );
    run(&e, &sql).await.unwrap();
    let query = "SELECT ticker, summarize_call(passage ORDER BY idx) AS s, \
                 summarize_call_error(passage ORDER BY idx) AS err FROM p GROUP BY ticker";
    let got = e.query(query).await.unwrap();
    assert_eq!(
        error_kinds(&got, "err"),
        vec![None],
        "the group is summarised"
    );
    let passages = e.query("SELECT passage FROM p ORDER BY idx").await.unwrap();
    let values: Vec<String> = strings(&passages, "passage")
        .into_iter()
        .flatten()
        .collect();
    let leaf_line = |j: usize, p: &str| format!("[{j}] {p}\n");
    let reduce_line = |_: usize, p: &str| format!("- {p}\n");
    let mut prompts = level(
        &values,
        "Summarise this call from its passages, in order.\n",
        &leaf_line,
        60,
    );
    let leaves = prompts.len();
    let (mut calls, mut levels) = (leaves, 1);
    while prompts.len() > 1 {
        // Each partial is the test server's answer to its prompt (no schema).
        let partials: Vec<String> = prompts
            .iter()
            .map(|u| {
                format!(
                    "Answer [{}]: the passage reports the figure.",
                    prompt_hash(None, u)
                )
            })
            .collect();
        prompts = level(
            &partials,
            "Combine these partial summaries.\n",
            &reduce_line,
            60,
        );
        calls += prompts.len();
        levels += 1;
    }
    assert!(levels >= 3, "the budget forces three levels: {levels}");
    assert_eq!(
        s.stats().requests as usize,
        calls,
        "{leaves} leaf calls, {calls} in all"
    );
    e.flush_cache().await.unwrap();
    s.reset_stats();
    let again = e.query(query).await.unwrap();
    assert_eq!(strings(&again, "s"), strings(&got, "s"));
    drop(e);
    let e = engine(&s, &[&toml], 2, Some(dir.path()));
    run(&e, &sql).await.unwrap();
    let third = e.query(query).await.unwrap();
    assert_eq!(strings(&third, "s"), strings(&got, "s"));
    assert_eq!(s.stats().requests, 0, "a re-run is answered by the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_counts_a_deep_reduction_as_the_run_makes_it() {
    let toml = summary_within(220);
    let s = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with_function(&s, dir.path(), &toml);
    // One group of 37 values of about 40 tokens: leaf calls of a few values each, then
    // reduce calls of a few partial results each, over more than one level.
    let sql = "SELECT g, summarize_call(v ORDER BY i) AS s FROM \
               (SELECT 1 AS g, value AS i, 'Passage ' || CAST(value AS VARCHAR) || \
               ': revenue grew by a few points as the company expanded its margins in every \
               segment, and management raised its guidance for the rest of the fiscal year.' \
               AS v FROM generate_series(1, 37)) GROUP BY g";
    let x = Engine::for_estimates(&cfg)
        .unwrap()
        .explain_script(sql, "q.sql")
        .await
        .unwrap();
    let t = &x.totals[0];
    assert_eq!(s.stats().requests, 0, "explain sends nothing");
    let e = Engine::new(&cfg).unwrap();
    let got = e.query(sql).await.unwrap();
    assert_eq!(strings(&got, "s").len(), 1, "one summary");
    let m = e.metrics();
    let f = &m.functions["summarize_call"];
    // The run sends every call of the tree: its partial results differ, so no two of its
    // reduce prompts are the same.
    assert_eq!(
        s.stats().requests,
        f.prompts,
        "the run: one request per call"
    );
    assert!(t.calls > 10, "a reduction of more than one level: {t:?}");
    assert_eq!(
        t.requests, t.calls,
        "explain counts a request per call, as the run makes them (its placeholder partials \
         are not one prompt): {t:?}"
    );
}

#[test]
fn aggregates_that_cannot_be_planned_are_refused_at_load_time() {
    let load = |t: &str| {
        FunctionDef::parse(t, Path::new("f.toml"))
            .unwrap_err()
            .to_string()
    };
    let no_loop = SUMMARY_FN.replace("{% for p in passages %}", "{% for p in [] %}");
    assert!(load(&no_loop).contains("must loop"), "{}", load(&no_loop));
    let no_reduce = format!("{SUMMARY_FN}max_input_tokens = 100\n");
    assert!(
        load(&no_reduce).contains("needs a reduce template"),
        "{}",
        load(&no_reduce)
    );
    let stray = format!("{}reduce = \"x\"\n", PROFILE_FN);
    assert!(
        load(&stray).contains("for kind = \"aggregate\""),
        "{}",
        load(&stray)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_partial_call_fails_is_null_with_a_typed_error() {
    let toml = format!(
        "{}max_input_tokens = 50\nreduce = \"\"\"Combine.\n{{% for p in partials %}}- {{{{ p }}}}\n{{% endfor %}}\"\"\"\n",
        SUMMARY_FN
    );
    let s = mock(MockConfig {
        permanent: vec![("POISON".into(), Fault::Server500)],
        ..MockConfig::default()
    })
    .await;
    let e = engine(&s, &[&toml], 2, None);
    let got = e
        .query(
            "SELECT g, summarize_call(v ORDER BY i) AS s, summarize_call_error(v ORDER BY i) AS err \
             FROM (SELECT value % 2 AS g, value AS i, arrow_cast(CASE WHEN value = 3 THEN 'POISON value' \
             ELSE 'value number ' || CAST(value AS VARCHAR) END, 'Utf8') AS v \
             FROM generate_series(1, 12)) GROUP BY g ORDER BY g",
        )
        .await
        .unwrap();
    let values = strings(&got, "s");
    let errors = error_kinds(&got, "err");
    // g = 1 holds the poisoned value: its leaf call fails after its attempts.
    assert!(
        values[0].is_some() && errors[0].is_none(),
        "{values:?} {errors:?}"
    );
    assert_eq!(values[1], None);
    assert_eq!(errors[1].as_deref(), Some("server_error"), "{errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectors_of_the_wrong_length_are_typed_errors() {
    // The test server answers 16 numbers; a function declaring 8 gets invalid_output, not a
    // misshapen column.
    let s = mock(MockConfig::default()).await;
    let eight = EMBED_FN.replace("dim = 16", "dim = 8");
    let e = embedding_engine(&s, &[&eight]).unwrap();
    let got = e
        .query(&format!(
            "SELECT embed(p) AS v, embed_error(p)['kind'] AS kind FROM ({})",
            passages_sql(3)
        ))
        .await
        .unwrap();
    assert_eq!(
        strings(&got, "kind"),
        vec![Some("invalid_output".to_string()); 3]
    );
    assert_eq!(got[0].column_by_name("v").unwrap().null_count(), 3);
}
