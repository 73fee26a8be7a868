//! LLM functions work in every SQL position, and each distinct call is made once per row.
//! Each test counts the requests the test server received.

mod support;

use support::*;

const PROFILE: &str = r#"
name = "profile"
args = ["x"]
prompt = "Describe {{ x }}"
output = { type = "object", properties = { a = { type = "string" }, b = { type = "integer" } }, required = ["a", "b"] }
"#;

const TRIPLE: &str = r#"
name = "triple"
args = ["x"]
prompt = "Three about {{ x }}"
output = { type = "array", items = { type = "string" }, minItems = 3, maxItems = 3 }
"#;

const SETUP: &str = "CREATE TABLE t AS VALUES ('alpha', 1), ('beta', 2), ('gamma', 3), ('delta', 4), ('epsilon', 5);\n\
                     CREATE VIEW v AS SELECT column1 AS x, column2 AS n FROM t;\n";

/// Runs `sql` after the 5-row setup and returns (printed output, requests received).
async fn requests_for(sql: &str) -> (String, u64) {
    let server = mock(MockConfig::default()).await;
    let engine = engine_with(&server, &[PROFILE, TRIPLE]);
    let out = run(&engine, &format!("{SETUP}{sql}"))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    (out, server.stats().requests)
}

fn rows_printed(out: &str) -> usize {
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('('))
        .expect("row count line");
    line.trim_start_matches('(')
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_list() {
    let (out, n) = requests_for("SELECT x, llm(x) AS y FROM v;").await;
    assert_eq!((rows_printed(&out), n), (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_call_referenced_twice_in_one_select() {
    let (out, n) = requests_for("SELECT llm(x) AS a, llm(x) AS b, length(llm(x)) FROM v;").await;
    assert_eq!((rows_printed(&out), n), (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_clause() {
    let (out, n) = requests_for("SELECT x FROM v WHERE llm(x) LIKE 'Answer%' AND n > 1;").await;
    // `n > 1` is applied before the calls: 4 rows, 4 calls.
    assert_eq!((rows_printed(&out), n), (4, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_and_select_share_the_call() {
    let (out, n) = requests_for("SELECT x, llm(x) FROM v WHERE llm(x) IS NOT NULL;").await;
    assert_eq!((rows_printed(&out), n), (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_calls() {
    let (out, n) = requests_for("SELECT llm(llm(x)) AS y FROM v;").await;
    assert_eq!((rows_printed(&out), n), (5, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subquery_in_from_and_in() {
    let (out, n) =
        requests_for("SELECT * FROM (SELECT x, llm(x) AS y FROM v) s WHERE y IS NOT NULL;").await;
    assert_eq!((rows_printed(&out), n), (5, 5));
    let (out, n) =
        requests_for("SELECT x FROM v WHERE x IN (SELECT x FROM v WHERE llm(x) LIKE 'Answer%');")
            .await;
    assert_eq!((rows_printed(&out), n), (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cte_referenced_twice() {
    let (out, n) = requests_for(
        "WITH a AS (SELECT x, llm(x) AS y FROM v) SELECT y FROM a UNION ALL SELECT y FROM a;",
    )
    .await;
    assert_eq!((rows_printed(&out), n), (10, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_by_key() {
    let (out, n) = requests_for("SELECT llm(x) AS k, count(*) AS c FROM v GROUP BY llm(x);").await;
    assert_eq!((rows_printed(&out), n), (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_distinct() {
    let (out, n) = requests_for("SELECT count(DISTINCT llm(x)) AS d FROM v;").await;
    assert!(out.contains("| 5 "), "{out}");
    assert_eq!(n, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_by() {
    let (out, n) = requests_for("SELECT x FROM v ORDER BY llm(x);").await;
    assert_eq!((rows_printed(&out), n), (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_argument() {
    let (out, n) =
        requests_for("SELECT x, first_value(llm(x)) OVER (ORDER BY n) AS f FROM v;").await;
    assert_eq!((rows_printed(&out), n), (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnest_argument() {
    let (out, n) = requests_for("SELECT x, unnest(triple(x)) AS q FROM v;").await;
    assert_eq!((rows_printed(&out), n), (15, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn struct_fields_of_a_subquery_call() {
    let (out, n) =
        requests_for("SELECT m, m['a'] AS a, m['b'] AS b FROM (SELECT profile(x) AS m FROM v);")
            .await;
    assert_eq!((rows_printed(&out), n), (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_table_as() {
    let (out, n) = requests_for(
        "CREATE TABLE r AS SELECT x, llm(x) AS y FROM v; SELECT * FROM r; SELECT y FROM r;",
    )
    .await;
    assert_eq!((rows_printed(&out), n), (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_to_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.parquet");
    let (out, n) = requests_for(&format!(
        "COPY (SELECT x, llm(x) AS y, profile(x) AS p FROM v) TO '{}' STORED AS PARQUET;",
        path.display()
    ))
    .await;
    assert!(out.contains("COPY 5 rows"), "{out}");
    assert_eq!(n, 10);
    let batches = read_parquet(&path).await;
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_bounds_the_calls() {
    let (out, n) = requests_for("SELECT llm(x) FROM v LIMIT 2;").await;
    assert_eq!((rows_printed(&out), n), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_text_in_sql_feeds_llm_calls() {
    let (out, n) = requests_for(
        "SELECT unnest(chunk_text(x || '. ' || x || ' again.', 8)) AS p FROM v; \
         SELECT p, llm(p) FROM (SELECT unnest(chunk_text(x || '. ' || x || ' again.', 8)) AS p FROM v);",
    )
    .await;
    // alpha. alpha again. -> "alpha.", "alpha", "again." ...: every chunk within 8 characters.
    assert!(out.lines().filter(|l| l.starts_with("| ")).all(|l| {
        l.split('|')
            .nth(1)
            .is_some_and(|c| c.trim().chars().count() <= 8)
    }));
    let rows = rows_printed(&out);
    assert!(rows >= 10, "{out}");
    // Identical chunks ("again.") are sent once.
    assert!(n < rows as u64, "{n} requests for {rows} rows");
}
