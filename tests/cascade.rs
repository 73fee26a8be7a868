//! Model cascades on real HTTP: every row goes to the small model with `logprobs`, the rows it
//! is unsure of (or fails) go to the large one; which model answered is a column and in the
//! error struct; each model's answers are cached under their own keys; the summary counts rows
//! per model and prices the cascade against the large model alone. The test server's small
//! model is right on 85% of prompts and unsure on most of the rest, decided by each prompt's
//! hash, so the tests know which rows must escalate.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::record_batch::RecordBatch;
use sluice::Engine;
use sluice::config::Config;
use sluice::udf::def::FunctionDef;
use support::mock_llm::{ConfidenceConfig, confidence};
use support::*;

const ROWS: usize = 200;

fn cascade_fn(name: &str, models: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nargs = [\"x\"]\nprompt = \"Is this statement material? {{{{ x }}}}\"\n\
         output = {{ type = \"boolean\" }}\n{models}\n{extra}\n"
    )
}

const CASCADE: &str =
    "cascade = [{ model = \"small\", min_confidence = 0.8 }, { model = \"large\" }]";

/// Two models on `server`, priced as a small and a large model are; the cache in `cache_dir`
/// when given.
fn two_models(server: &MockServer, cache_dir: Option<&Path>) -> Config {
    let url = server.base_url();
    let cache = match cache_dir {
        Some(d) => format!("enabled = true\ndir = \"{}\"", d.display()),
        None => "enabled = false".into(),
    };
    let text = format!(
        "[dispatcher]\nconcurrency = 16\nmax_attempts = 2\nbackoff_base_ms = 2\nbackoff_max_ms = 20\n\n\
         [cache]\n{cache}\n\n\
         [models.small]\nkind = \"openai\"\nbase_url = \"{url}\"\nmodel = \"small\"\n\
         input_usd_per_mtok = 0.15\noutput_usd_per_mtok = 0.6\n\n\
         [models.large]\nkind = \"openai\"\nbase_url = \"{url}\"\nmodel = \"large\"\n\
         input_usd_per_mtok = 2.5\noutput_usd_per_mtok = 10.0\n"
    );
    Config::parse(&text, Path::new("sluice.toml"), &|_| None).expect("config parses")
}

fn engine(cfg: &Config, defs: &[String]) -> Result<Engine, String> {
    let defs = defs
        .iter()
        .map(|t| FunctionDef::parse(t, Path::new("f.toml")).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    Engine::with_functions(cfg, defs).map_err(|e| e.to_string())
}

fn small_model() -> MockConfig {
    MockConfig {
        confidence: ConfidenceConfig {
            small_model: Some("small".into()),
            ..ConfidenceConfig::default()
        },
        ..MockConfig::default()
    }
}

fn statements() -> Vec<String> {
    (0..ROWS).map(|i| format!("s{i:03}")).collect()
}

/// Whether the small model is unsure of statement `s` (the row goes on to the large model),
/// and whether it is right.
fn judged(s: &str) -> (bool, bool) {
    let hash = prompt_hash(None, &format!("Is this statement material? {s}"));
    let cfg = small_model().confidence;
    let (right, confidence) = confidence::judge(&cfg, "small", &hash);
    (confidence < 0.8, right)
}

/// `f(x)`, `f_model(x)` and `f_error(x)['model']` of every statement, by statement.
async fn answers(engine: &Engine, f: &str) -> BTreeMap<String, (String, String, String)> {
    let values: Vec<String> = statements().iter().map(|s| format!("('{s}')")).collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.parquet");
    let sql = format!(
        "COPY (SELECT column1 AS x, CAST({f}(column1) AS VARCHAR) AS v, {f}_model(column1) AS m, \
         {f}_error(column1)['model'] AS em FROM (VALUES {})) TO '{}' STORED AS PARQUET;",
        values.join(", "),
        out.display()
    );
    run(engine, &sql).await.expect("runs");
    let batches = read_parquet(&out).await;
    let col = |c: &str| text(&batches, c);
    let (x, v, m, em) = (col("x"), col("v"), col("m"), col("em"));
    let s = |o: &Option<String>| o.clone().unwrap_or_else(|| "NULL".into());
    (0..x.len())
        .map(|i| (s(&x[i]), (s(&v[i]), s(&m[i]), s(&em[i]))))
        .collect()
}

/// Column `col` of `batches` as text.
fn text(batches: &[RecordBatch], col: &str) -> Vec<Option<String>> {
    let mut out = vec![];
    for b in batches {
        let a = b
            .column_by_name(col)
            .unwrap_or_else(|| panic!("column {col}"));
        let a = cast(a, &DataType::Utf8).expect("casts to text");
        let s = a.as_string::<i32>();
        out.extend((0..s.len()).map(|i| s.is_valid(i).then(|| s.value(i).to_string())));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_small_model_is_unsure_of_go_to_the_large_one() {
    let server = mock(small_model()).await;
    let cache = tempfile::tempdir().unwrap();
    let cfg = two_models(&server, Some(cache.path()));
    let e = engine(&cfg, &[cascade_fn("material", CASCADE, "")]).unwrap();
    let got = answers(&e, "material").await;
    assert_eq!(got.len(), ROWS);

    let escalated: Vec<&String> = got.keys().filter(|s| judged(s).0).collect();
    assert!(
        (15..=60).contains(&escalated.len()),
        "the test server's small model is unsure of about 16% of rows: {}",
        escalated.len()
    );
    for (s, (v, m, em)) in &got {
        let want = if judged(s).0 { "large" } else { "small" };
        assert_eq!(m, want, "{s}: answered by");
        assert_ne!(v, "NULL", "{s}");
        assert_eq!(em, "NULL", "{s}: no error");
    }
    // Every row asked once of the small model; only the unsure ones of the large one.
    let stats = server.stats();
    assert_eq!(stats.by_model.get("small"), Some(&(ROWS as u64)));
    assert_eq!(stats.by_model.get("large"), Some(&(escalated.len() as u64)));

    // The summary's rows per model, and what they cost.
    let m = e.metrics();
    let f = &m.functions["material"];
    assert_eq!(f.prompts, ROWS as u64, "a row passed on counts once");
    assert_eq!(f.requests, (ROWS + escalated.len()) as u64);
    let c = &f.cascade;
    assert_eq!(c.len(), 2);
    assert_eq!((c[0].model.as_str(), c[0].asked), ("small", ROWS as u64));
    assert_eq!(c[0].answered, (ROWS - escalated.len()) as u64);
    assert_eq!(
        (c[1].asked, c[1].answered),
        (escalated.len() as u64, escalated.len() as u64)
    );
    let spent = c[0].cost_usd + c[1].cost_usd;
    assert!(
        (spent - m.cost_usd).abs() < 1e-6,
        "{spent} vs {}",
        m.cost_usd
    );
    let (alone, cascade_cost) = f.cascade_costs().expect("priced");
    assert!((cascade_cost - spent).abs() < 1e-12);
    assert!(
        alone > spent,
        "the large model alone costs more: {alone} vs {spent}"
    );
    let summary = sluice::cli::format_summary(&m);
    assert!(
        summary.contains(&format!(
            "cascade: small answered {} of {ROWS} rows, large {} of {}",
            ROWS - escalated.len(),
            escalated.len(),
            escalated.len()
        )),
        "{summary}"
    );
    assert!(summary.contains("saved against large alone"), "{summary}");

    // Each model's answers are cached under their own keys: a re-run asks nothing.
    server.reset_stats();
    drop(e);
    let again = engine(&cfg, &[cascade_fn("material", CASCADE, "")]).unwrap();
    assert_eq!(answers(&again, "material").await, got);
    assert_eq!(server.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cascade_agrees_with_the_large_model_where_the_small_one_was_sure_and_right() {
    let server = mock(small_model()).await;
    let cfg = two_models(&server, None);
    let e = engine(
        &cfg,
        &[
            cascade_fn("material", CASCADE, ""),
            cascade_fn("material_large", "model = \"large\"", ""),
        ],
    )
    .unwrap();
    let cascade = answers(&e, "material").await;
    let large = answers(&e, "material_large").await;
    for (s, (v, _, _)) in &cascade {
        let (unsure, right) = judged(s);
        let agrees = v == &large[s].0;
        assert_eq!(agrees, unsure || right, "{s}: {v} vs {}", large[s].0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_row_names_the_last_model_it_was_asked_of() {
    let server = mock(MockConfig {
        permanent: vec![("s007".into(), Fault::Server500)],
        ..small_model()
    })
    .await;
    let cfg = two_models(&server, None);
    let e = engine(&cfg, &[cascade_fn("material", CASCADE, "")]).unwrap();
    let got = answers(&e, "material").await;
    // The small model failed it, so the large one was asked, and failed it too.
    assert_eq!(got["s007"], ("NULL".into(), "NULL".into(), "large".into()));
    let stats = server.stats();
    let large_asked = got.keys().filter(|s| judged(s).0 || *s == "s007").count() as u64;
    assert_eq!(stats.by_model.get("large").copied(), Some(large_asked + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_rows_go_on_by_their_request_s_confidence() {
    let server = mock(small_model()).await;
    let cfg = two_models(&server, None);
    let packed = format!(
        "name = \"material\"\nargs = [\"x\"]\nrows_per_prompt = 4\nitem = \"{{{{ x }}}}\"\n\
         prompt = \"\"\"Is each statement material?\n{{% for item in items %}}### Item \
         {{{{ loop.index }}}}\n{{{{ item }}}}\n{{% endfor %}}\"\"\"\noutput = {{ type = \"boolean\" }}\n\
         {CASCADE}\n"
    );
    let e = engine(&cfg, &[packed]).unwrap();
    let got = answers(&e, "material").await;
    assert_eq!(got.len(), ROWS);
    assert!(got.values().all(|(v, m, _)| v != "NULL" && m != "NULL"));
    let by_large = got.values().filter(|(_, m, _)| m == "large").count();
    let stats = server.stats();
    // The small model is asked each row once, four to a request.
    assert_eq!(stats.by_model.get("small"), Some(&((ROWS / 4) as u64)));
    // Rows go on four at a time: a request's rows share its confidence.
    assert_eq!(by_large % 4, 0, "{by_large}");
    assert_eq!(
        stats.by_model.get("large").copied().unwrap_or(0),
        (by_large / 4) as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascade_is_refused_where_a_model_gives_no_confidence() {
    let server = mock(MockConfig::default()).await;
    let url = server.base_url();
    let mut cfg = two_models(&server, None);
    let text = format!(
        "[models.claude]\nkind = \"anthropic\"\nbase_url = \"{url}\"\nmodel = \"claude\"\n"
    );
    let env = |name: &str| (name != "SLUICE_CLUSTER_TOKEN").then(|| "k".to_string());
    let extra = Config::parse(&text, Path::new("sluice.toml"), &env).expect("parses");
    cfg.models.extend(extra.models);
    let models = "cascade = [{ model = \"claude\", min_confidence = 0.8 }, { model = \"large\" }]";
    let err = engine(&cfg, &[cascade_fn("material", models, "")]).unwrap_err();
    assert!(err.contains("gives no token log-probabilities"), "{err}");
    assert!(!err.contains('\n'), "{err}");
    // Last in the cascade, it needs none.
    let models = "cascade = [{ model = \"small\", min_confidence = 0.8 }, { model = \"claude\" }]";
    engine(&cfg, &[cascade_fn("material", models, "")]).expect("last needs no confidence");

    // A model sluice.toml does not define is named when a statement uses the function.
    let models = "cascade = [{ model = \"small\", min_confidence = 0.8 }, { model = \"huge\" }]";
    let e = engine(&cfg, &[cascade_fn("material", models, "")]).unwrap();
    let err = run(&e, "SELECT material('a')").await.unwrap_err();
    assert!(err.contains("\"huge\""), "{err}");
    assert_eq!(server.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_estimates_the_share_of_rows_a_sample_passes_on() {
    let server = mock(small_model()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = two_models(&server, Some(&dir.path().join("cache")));
    cfg.udf_dir = dir.path().join("udfs");
    std::fs::create_dir_all(&cfg.udf_dir).unwrap();
    std::fs::write(
        cfg.udf_dir.join("m.toml"),
        cascade_fn("material", CASCADE, ""),
    )
    .unwrap();
    let data = dir.path().join("s.jsonl");
    let lines: Vec<String> = statements()
        .iter()
        .map(|s| format!("{{\"x\": \"{s}\"}}"))
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let sql = format!(
        "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION '{}';\nSELECT material(x) FROM t;",
        data.display()
    );
    let material = |x: &sluice::engine::Explanation| {
        x.totals
            .iter()
            .find(|f| f.function == "material")
            .cloned()
            .expect("material is estimated")
    };

    // Placeholder answers have no confidence: every row of every model, an upper bound.
    let upper = {
        let e = Engine::for_estimates(&cfg).unwrap();
        let x = e.explain_script(&sql, "q.sql").await.unwrap();
        assert!(
            x.to_text(false).contains("an upper bound"),
            "{}",
            x.to_text(false)
        );
        material(&x)
    };
    assert_eq!(upper.cascade.len(), 2);
    assert_eq!((upper.cascade[0].rows, upper.cascade[1].rows), (200, 200));
    assert_eq!(server.stats().requests, 0);

    // A sample of 100 rows measures the share passed on.
    let sample = {
        let e = Engine::new(&cfg).unwrap();
        let m = e.sample_script(&sql, "q.sql", 100).await.unwrap();
        e.flush_cache().await.unwrap();
        m
    };
    let unsure = statements()[..100].iter().filter(|s| judged(s).0).count();
    assert_eq!(
        server.stats().by_model.get("large").copied(),
        Some(unsure as u64)
    );
    let e = Engine::for_estimates(&cfg).unwrap();
    let mut x = e.explain_script(&sql, "q.sql").await.unwrap();
    e.extrapolate(&mut x, &sample, 100);
    let f = material(&x);
    let share = unsure as f64 / 100.0;
    assert!((f.cascade[1].share - share).abs() < 1e-9, "{:?}", f.cascade);
    assert!(f.cascade[1].measured);
    assert_eq!(f.cascade[1].rows, (200.0 * share).round() as u64);
    let (cost, upper_cost) = (f.cost_usd.unwrap(), upper.cost_usd.unwrap());
    assert!(cost < upper_cost, "{cost} vs {upper_cost}");
    assert!(
        x.to_text(false).contains("measured on the sample"),
        "{}",
        x.to_text(false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_the_coordinator_counts_every_worker_s_cascade() {
    use support::workers::{KEY, cluster_project, sluice_ok, spawn_workers, worker_list};
    let server = mock(MockConfig {
        api_key: Some(KEY.to_string()),
        ..small_model()
    })
    .await;
    let p = cluster_project(&server.base_url(), 8);
    let url = server.base_url();
    let models = format!(
        "\n[models.small]\nkind = \"openai\"\nbase_url = \"{url}\"\nmodel = \"small\"\n\
         api_key_env = \"SLUICE_CLUSTER_KEY\"\ninput_usd_per_mtok = 0.15\noutput_usd_per_mtok = 0.6\n\
         \n[models.large]\nkind = \"openai\"\nbase_url = \"{url}\"\nmodel = \"large\"\n\
         api_key_env = \"SLUICE_CLUSTER_KEY\"\ninput_usd_per_mtok = 2.5\noutput_usd_per_mtok = 10.0\n"
    );
    let toml = std::fs::read_to_string(p.path("sluice.toml")).unwrap() + &models;
    p.write("sluice.toml", &toml);
    p.write("udfs/material.toml", &cascade_fn("material", CASCADE, ""));
    p.write(
        "m.sql",
        "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 'data/';\n\
         COPY (SELECT material(x) AS v, material_model(x) AS m FROM \
         (SELECT unnest(chunk_text(transcript, 200)) AS x FROM t)) \
         TO 'out/m.parquet' STORED AS PARQUET;\n",
    );
    let run = |args: &[&str]| {
        let mut all = vec!["run", "--metrics-json", "metrics.json"];
        all.extend_from_slice(args);
        all.push("m.sql");
        sluice_ok(&p, &all);
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p.path("metrics.json")).unwrap())
                .unwrap();
        m
    };
    let alone = run(&["--no-cache"]);
    let expected = text(&read_parquet(&p.path("out/m.parquet")).await, "m");
    let large = expected
        .iter()
        .filter(|m| m.as_deref() == Some("large"))
        .count();
    assert!(
        large > 0 && large < expected.len(),
        "{large} of {}",
        expected.len()
    );
    server.reset_stats();

    let workers = spawn_workers(&p, 3);
    let m = run(&["--no-cache", "--workers", &worker_list(&workers)]);
    let stats = server.stats();
    let mut got = text(&read_parquet(&p.path("out/m.parquet")).await, "m");
    let mut want = expected.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "the same models answered the same rows");
    // Rows per model as the single process counted them (rows, not requests: identical
    // passages share a call), and every request the workers sent.
    let cascade = &m["functions"]["material"]["cascade"]["models"];
    for (i, model) in ["small", "large"].iter().enumerate() {
        assert_eq!(cascade[i]["model"], *model, "{m}");
        let alone = &alone["functions"]["material"]["cascade"]["models"][i];
        assert_eq!(cascade[i]["asked"], alone["asked"], "{model}: {m}");
        assert_eq!(cascade[i]["answered"], alone["answered"], "{model}: {m}");
    }
    assert_eq!(m["requests"].as_u64(), Some(stats.requests), "{m}");
    assert_eq!(
        stats.by_model.values().sum::<u64>(),
        stats.requests,
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_answers_and_join_conditions_go_on_by_their_confidence_too() {
    let server = mock(small_model()).await;
    let cfg = two_models(&server, None);
    let text_fn =
        "name = \"gist\"\nargs = [\"x\"]\nprompt = \"Sum up: {{ x }}\"\n".to_string() + CASCADE;
    let pair_fn = "name = \"related\"\nargs = [\"a\", \"b\"]\n\
                   prompt = \"Related? {{ a }} / {{ b }}\"\noutput = { type = \"boolean\" }\n"
        .to_string()
        + CASCADE;
    let e = engine(&cfg, &[text_fn, pair_fn]).unwrap();

    // Text: an answer the small model was unsure of is the large model's.
    let got = answers(&e, "gist").await;
    for (s, (v, m, _)) in &got {
        let hash = prompt_hash(None, &format!("Sum up: {s}"));
        let (right, confidence) = confidence::judge(&small_model().confidence, "small", &hash);
        let want = if confidence < 0.8 { "large" } else { "small" };
        assert_eq!(m, want, "{s}");
        assert_eq!(v.ends_with("(wrong)"), m == "small" && !right, "{s}: {v}");
    }

    // A join condition: every surviving pair asked of the small model once, the unsure ones of
    // the large one.
    server.reset_stats();
    let side: Vec<String> = (0..8).map(|i| format!("('p{i}')")).collect();
    let sql = format!(
        "SELECT count(*) AS n FROM (VALUES {side}) AS a(x) JOIN (VALUES {side}) AS b(y) \
         ON a.x < b.y AND related(a.x, b.y)",
        side = side.join(", ")
    );
    run(&e, &sql).await.unwrap();
    let pairs: Vec<(usize, usize)> = (0..8)
        .flat_map(|i| (i + 1..8).map(move |j| (i, j)))
        .collect();
    let unsure = pairs
        .iter()
        .filter(|(i, j)| {
            let hash = prompt_hash(None, &format!("Related? p{i} / p{j}"));
            confidence::judge(&small_model().confidence, "small", &hash).1 < 0.8
        })
        .count() as u64;
    assert!(unsure > 0, "some of the 28 pairs go on");
    let stats = server.stats();
    assert_eq!(
        stats.by_model.get("small").copied(),
        Some(pairs.len() as u64)
    );
    assert_eq!(stats.by_model.get("large").copied().unwrap_or(0), unsure);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gemini_model_leads_a_cascade_by_its_logprobs_result() {
    let server = mock(small_model()).await;
    let mut cfg = two_models(&server, None);
    let text = format!(
        "[models.small]\nkind = \"gemini\"\nbase_url = \"http://{}\"\nmodel = \"small\"\n\
         api_key_env = \"GEM_KEY\"\ninput_usd_per_mtok = 0.1\noutput_usd_per_mtok = 0.4\n",
        server.addr()
    );
    let env = |name: &str| (name == "GEM_KEY").then(|| "gem-key".to_string());
    let gemini = Config::parse(&text, Path::new("sluice.toml"), &env).expect("parses");
    cfg.models.extend(gemini.models);
    let e = engine(&cfg, &[cascade_fn("material", CASCADE, "")]).unwrap();
    let got = answers(&e, "material").await;
    let escalated = got.keys().filter(|s| judged(s).0).count();
    for (s, (v, m, _)) in &got {
        let want = if judged(s).0 { "large" } else { "small" };
        assert_eq!(m, want, "{s}: {v}");
    }
    let st = server.stats();
    assert_eq!(st.gemini.requests, ROWS as u64);
    assert_eq!(st.by_model.get("large").copied(), Some(escalated as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_model_that_refuses_its_key_fails_the_statement_instead_of_passing_rows_on() {
    let server = mock(MockConfig {
        api_key: Some("right-key".into()),
        ..small_model()
    })
    .await;
    let url = server.base_url();
    let text = format!(
        "[dispatcher]\nmax_attempts = 2\nbackoff_base_ms = 2\n[cache]\nenabled = false\n\
         [models.small]\nkind = \"openai\"\nbase_url = \"{url}\"\nmodel = \"small\"\n\
         api_key_env = \"SMALL_KEY\"\n\
         [models.large]\nkind = \"openai\"\nbase_url = \"{url}\"\nmodel = \"large\"\n\
         api_key_env = \"LARGE_KEY\"\n"
    );
    let env = |name: &str| match name {
        "SMALL_KEY" => Some("wrong-key".to_string()),
        "LARGE_KEY" => Some("right-key".to_string()),
        _ => None,
    };
    let cfg = Config::parse(&text, Path::new("sluice.toml"), &env).unwrap();
    let e = engine(&cfg, &[cascade_fn("material", CASCADE, "")]).unwrap();
    let err = run(&e, "SELECT material('a'), material('b')")
        .await
        .unwrap_err();
    assert!(err.contains("material(): model \"small\" failed"), "{err}");
    assert!(
        !err.contains("wrong-key") && !err.contains("right-key"),
        "{err}"
    );
    assert_eq!(
        server.stats().by_model.get("large"),
        None,
        "nothing went on"
    );
}
