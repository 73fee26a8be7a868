//! Object storage on a real S3-compatible server (moto on 127.0.0.1): the flagship reads its
//! transcripts from S3 and writes Parquet to S3, partitioned writes give one prefix per company,
//! and bad buckets, credentials and endpoints fail cleanly without leaking the secret.

mod support;

use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};
use support::s3::{Moto, SECRET_KEY};
use support::*;

async fn put_file(store: &dyn ObjectStore, key: &str, path: &std::path::Path) {
    let bytes = std::fs::read(path).unwrap();
    store.put(&ObjPath::from(key), bytes.into()).await.unwrap();
}

async fn list(store: &dyn ObjectStore) -> Vec<String> {
    let mut names: Vec<String> = store
        .list(None)
        .map_ok(|o| o.location.to_string())
        .try_collect()
        .await
        .unwrap();
    names.sort();
    names
}

/// Reads every Parquet object of `store` under `prefix` back into sorted rows.
async fn read_back(store: &dyn ObjectStore, prefix: &str) -> Vec<String> {
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut batches = vec![];
    for name in list(store).await {
        if !name.starts_with(prefix) || !name.ends_with(".parquet") {
            continue;
        }
        let bytes = store
            .get(&ObjPath::from(name.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .expect("valid parquet")
            .build()
            .unwrap();
        for b in reader {
            batches.push(b.unwrap());
        }
    }
    sorted_rows(&batches)
}

fn run_with(p: &Project, sql: &str, env: &[(&'static str, String)]) -> (i32, String, String) {
    p.write("q.sql", sql);
    let mut cmd = p.command(&["-vv", "run", "q.sql"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagship_reads_from_and_writes_to_s3() {
    let moto = Moto::start();
    moto.create_bucket("corpus").await;
    moto.create_bucket("results").await;
    let corpus = moto.store("corpus");
    put_file(
        &corpus,
        "transcripts/excerpts.jsonl",
        &shared_data("earnings_transcript_excerpts.jsonl"),
    )
    .await;
    put_file(
        &corpus,
        "demo/demo.jsonl",
        &repo().join("data/transcripts/demo.jsonl"),
    )
    .await;
    let llm = mock(MockConfig::default()).await;
    let p = Project::new(&llm.base_url(), 8, false);

    // The same pipeline on local disk gives the reference rows.
    let local_sql = project_flagship_sql("out/qa.parquet");
    let (code, _, err) = run_with(&p, &local_sql, &[]);
    assert_eq!(code, 0, "{err}");
    let expected = sorted_rows(&read_parquet(&p.path("out/qa.parquet")).await);
    assert_eq!(expected.len(), 42);

    let s3_sql = local_sql
        .replace("'data/'", "'s3://corpus/transcripts/'")
        .replace("'out/qa.parquet'", "'s3://results/qa/earnings_qa.parquet'");
    let (code, out, err) = run_with(&p, &s3_sql, &moto.env());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("COPY 42 rows to s3://results/qa/earnings_qa.parquet"),
        "{out}"
    );
    let results = moto.store("results");
    assert_eq!(list(&results).await, ["qa/earnings_qa.parquet"]);
    assert_eq!(read_back(&results, "qa/").await, expected);

    // Partitioned by company: one prefix per company of the demo corpus.
    let sql = "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 's3://corpus/demo/';\n\
        COPY (SELECT ticker AS company, q AS quarter, \
              answer_question(ticker, q, date, transcript, 'What was revenue?') AS answer \
              FROM t) TO 's3://results/by_company/' STORED AS PARQUET PARTITIONED BY (company);\n";
    let (code, _, err) = run_with(&p, sql, &moto.env());
    assert_eq!(code, 0, "{err}");
    let demo = std::fs::read_to_string(repo().join("data/transcripts/demo.jsonl")).unwrap();
    let mut companies: Vec<String> = demo
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["ticker"].to_string())
        .map(|t| format!("by_company/company={}", t.trim_matches('"')))
        .collect();
    companies.sort();
    companies.dedup();
    assert!(companies.len() >= 2);
    let mut prefixes: Vec<String> = list(&results)
        .await
        .into_iter()
        .filter(|n| n.starts_with("by_company/"))
        .map(|n| n.rsplit_once('/').unwrap().0.to_string())
        .collect();
    prefixes.dedup();
    assert_eq!(prefixes, companies);
    assert_eq!(
        read_back(&results, "by_company/").await.len(),
        demo.lines().count()
    );
    assert!(
        !list(&results)
            .await
            .iter()
            .any(|n| n.contains("sluice-tmp")),
        "no staging objects remain"
    );
    assert!(!err.contains(SECRET_KEY));
}

/// A failed run: exit ≠ 0, an error line with every needle, no secret, nothing written.
fn assert_failed(r: &(i32, String, String), needles: &[&str]) {
    let (code, _, err) = r;
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line:\n{err}"));
    eprintln!("[{code}] {line}");
    assert_ne!(*code, 0);
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains(SECRET_KEY), "the secret leaked:\n{err}");
    for n in needles {
        assert!(line.contains(n), "{line:?} should mention {n:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_buckets_credentials_and_endpoints_fail_cleanly() {
    let moto = Moto::start();
    moto.create_bucket("results").await;
    let llm = mock(MockConfig::default()).await;
    let p = Project::new(&llm.base_url(), 8, false);
    let copy_to = |target: &str| {
        format!(
            "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 'data/';\n\
             COPY (SELECT ticker, answer_question(ticker, q, date, transcript, 'Revenue?') AS a \
             FROM t) TO '{target}' STORED AS PARQUET;\n"
        )
    };

    // Missing bucket.
    let r = run_with(&p, &copy_to("s3://no-such-bucket/qa.parquet"), &moto.env());
    assert_failed(&r, &["no-such-bucket", "q.sql:2"]);

    // Reading a missing bucket.
    let r = run_with(
        &p,
        "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION 's3://missing-input/x/';\n\
         SELECT * FROM t;\n",
        &moto.env(),
    );
    assert_failed(&r, &["missing-input"]);

    // Unreachable endpoint.
    let mut env = moto.env();
    env[0].1 = "http://127.0.0.1:9".to_string();
    let r = run_with(&p, &copy_to("s3://results/qa.parquet"), &env);
    assert_failed(&r, &["results", "q.sql:2"]);

    // Nothing partial in the bucket after the failures, and no LLM call was paid for: the
    // target is checked before the query runs.
    assert!(list(&moto.store("results")).await.is_empty());
    assert_eq!(llm.stats().requests, 0);

    // Wrong credentials: a moto that checks them (every request authenticated).
    let strict = Moto::start_with_auth();
    let r = run_with(&p, &copy_to("s3://results/qa.parquet"), &strict.env());
    assert_failed(&r, &["results"]);
}
