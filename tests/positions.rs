//! LLM functions work in every SQL position, and each distinct call is made once per row.
//! Each test counts the requests the test server received and checks the values, and their
//! order where the SQL orders them, against the test server's answers (which carry the hash of
//! their prompt).

mod support;

use support::*;

const PROFILE: &str = PROFILE_FN;

const TRIPLE: &str = r#"
name = "triple"
args = ["x"]
prompt = "Three about {{ x }}"
output = { type = "array", items = { type = "string" }, minItems = 3, maxItems = 3 }
"#;

const SETUP: &str = "CREATE TABLE t AS VALUES ('alpha', 1), ('beta', 2), ('gamma', 3), ('delta', 4), ('epsilon', 5);\n\
                     CREATE VIEW v AS SELECT column1 AS x, column2 AS n FROM t;\n";

/// Runs the 5-row setup, then `sql`; returns (the rows of the last statement, in order, columns
/// joined by ` | `; requests received).
async fn rows_for(sql: &str) -> (Vec<String>, u64) {
    let server = mock(MockConfig::default()).await;
    let engine = engine_with(&server, &[PROFILE, TRIPLE]);
    run(&engine, SETUP).await.expect("setup");
    let statements = sluice::engine::split_statements(sql);
    let (last, before) = statements.split_last().expect("a statement");
    for st in before {
        run(&engine, &format!("{};", st.text))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", st.text));
    }
    let batches = engine
        .query(&last.text)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    (ordered_rows(&batches), server.stats().requests)
}

const XS: [&str; 5] = ["alpha", "beta", "gamma", "delta", "epsilon"];

/// The test server's answer to `llm(x)` (the prompt is `x`).
fn answer(x: &str) -> String {
    format!(
        "Answer [{}]: the passage reports the figure.",
        prompt_hash(None, x)
    )
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn each(f: impl Fn(&str) -> String) -> Vec<String> {
    sorted(XS.iter().map(|x| f(x)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_list() {
    let (rows, n) = rows_for("SELECT x, llm(x) AS y FROM v;").await;
    assert_eq!(sorted(rows), each(|x| format!("{x} | {}", answer(x))));
    assert_eq!(n, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_call_referenced_twice_in_one_select() {
    let (rows, n) = rows_for("SELECT llm(x) AS a, llm(x) AS b, length(llm(x)) AS l FROM v;").await;
    let expected = each(|x| {
        let a = answer(x);
        format!("{a} | {a} | {}", a.chars().count())
    });
    assert_eq!(sorted(rows), expected);
    assert_eq!(n, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_clause() {
    let (rows, n) = rows_for("SELECT x FROM v WHERE llm(x) LIKE 'Answer%' AND n > 1;").await;
    // `n > 1` is applied before the calls: 4 rows, 4 calls.
    assert_eq!(
        sorted(rows),
        sorted(XS[1..].iter().map(|x| x.to_string()).collect())
    );
    assert_eq!(n, 4);
    // A filter on the value keeps exactly the rows whose answer matches.
    let target = answer("gamma");
    let (rows, n) = rows_for(&format!("SELECT x FROM v WHERE llm(x) = '{target}';")).await;
    assert_eq!((rows, n), (vec!["gamma".to_string()], 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_and_select_share_the_call() {
    let (rows, n) = rows_for("SELECT x, llm(x) FROM v WHERE llm(x) IS NOT NULL;").await;
    assert_eq!(sorted(rows), each(|x| format!("{x} | {}", answer(x))));
    assert_eq!(n, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_calls() {
    let (rows, n) = rows_for("SELECT llm(llm(x)) AS y FROM v;").await;
    assert_eq!(sorted(rows), each(|x| answer(&answer(x))));
    assert_eq!(n, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subquery_in_from_and_in() {
    let (rows, n) =
        rows_for("SELECT * FROM (SELECT x, llm(x) AS y FROM v) s WHERE y IS NOT NULL;").await;
    assert_eq!(sorted(rows), each(|x| format!("{x} | {}", answer(x))));
    assert_eq!(n, 5);
    let (rows, n) =
        rows_for("SELECT x FROM v WHERE x IN (SELECT x FROM v WHERE llm(x) LIKE 'Answer%');").await;
    assert_eq!(sorted(rows), each(str::to_string));
    assert_eq!(n, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cte_referenced_twice() {
    let (rows, n) = rows_for(
        "WITH a AS (SELECT x, llm(x) AS y FROM v) SELECT y FROM a UNION ALL SELECT y FROM a;",
    )
    .await;
    let mut expected = each(answer);
    expected.extend(each(answer));
    assert_eq!(sorted(rows), sorted(expected));
    assert_eq!(n, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_by_key() {
    let (rows, n) = rows_for("SELECT llm(x) AS k, count(*) AS c FROM v GROUP BY llm(x);").await;
    assert_eq!(sorted(rows), each(|x| format!("{} | 1", answer(x))));
    assert_eq!(n, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_distinct() {
    let (rows, n) = rows_for("SELECT count(DISTINCT llm(x)) AS d FROM v;").await;
    assert_eq!((rows, n), (vec!["5".to_string()], 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_by() {
    // The rows come out in the order of their answers, ascending and descending.
    let mut by_answer: Vec<&str> = XS.to_vec();
    by_answer.sort_by_key(|x| answer(x));
    let (rows, n) = rows_for("SELECT x FROM v ORDER BY llm(x);").await;
    assert_eq!(rows, by_answer);
    assert_eq!(n, 5);
    let (rows, _) = rows_for("SELECT x, llm(x) AS y FROM v ORDER BY y DESC;").await;
    let descending: Vec<String> = by_answer
        .iter()
        .rev()
        .map(|x| format!("{x} | {}", answer(x)))
        .collect();
    assert_eq!(rows, descending);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_by_a_plain_column_holds_over_the_calls_it_is_lifted_below() {
    // The sort runs below the lifted calls; the calls keep its order.
    let (rows, n) = rows_for("SELECT x, llm(x) AS y FROM v ORDER BY n DESC;").await;
    let want: Vec<String> = XS
        .iter()
        .rev()
        .map(|x| format!("{x} | {}", answer(x)))
        .collect();
    assert_eq!((rows, n), (want, 5));
    let (rows, _) = rows_for("SELECT x, llm(x) AS y FROM v ORDER BY x;").await;
    let mut xs = XS.to_vec();
    xs.sort();
    let want: Vec<String> = xs.iter().map(|x| format!("{x} | {}", answer(x))).collect();
    assert_eq!(rows, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_argument() {
    let (rows, n) =
        rows_for("SELECT x, first_value(llm(x)) OVER (ORDER BY n) AS f FROM v ORDER BY n;").await;
    // Ordered by n, the first value of the window is alpha's answer on every row.
    let expected: Vec<String> = XS
        .iter()
        .map(|x| format!("{x} | {}", answer("alpha")))
        .collect();
    assert_eq!(rows, expected);
    assert_eq!(n, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnest_argument() {
    let (rows, n) = rows_for("SELECT x, unnest(triple(x)) AS q FROM v;").await;
    let expected = sorted(
        XS.iter()
            .flat_map(|x| {
                let h = prompt_hash(None, &format!("Three about {x}"));
                (1..=3).map(move |i| format!("{x} | What was the figure for item {i} [{h}]?"))
            })
            .collect(),
    );
    assert_eq!(sorted(rows), expected);
    assert_eq!(n, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn struct_fields_of_a_subquery_call() {
    let (rows, n) =
        rows_for("SELECT x, m['a'] AS a FROM (SELECT x, profile(x) AS m FROM v);").await;
    let expected = each(|x| {
        let h = prompt_hash(None, &format!("Describe {x}"));
        format!("{x} | a [{h}]")
    });
    assert_eq!(sorted(rows), expected);
    assert_eq!(n, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_table_as() {
    let (rows, n) = rows_for(
        "CREATE TABLE r AS SELECT x, llm(x) AS y FROM v; SELECT * FROM r; SELECT x, y FROM r;",
    )
    .await;
    assert_eq!(sorted(rows), each(|x| format!("{x} | {}", answer(x))));
    assert_eq!(n, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_to_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.parquet");
    let (rows, n) = rows_for(&format!(
        "COPY (SELECT x, llm(x) AS y, profile(x)['a'] AS a FROM v) TO '{}' STORED AS PARQUET;",
        path.display()
    ))
    .await;
    assert_eq!(rows, vec!["5".to_string()], "COPY reports 5 rows");
    assert_eq!(n, 10);
    let written = sorted_rows(&read_parquet(&path).await);
    let expected = each(|x| {
        let h = prompt_hash(None, &format!("Describe {x}"));
        format!("{x} | {} | a [{h}]", answer(x))
    });
    assert_eq!(written, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_bounds_the_calls() {
    let (rows, n) = rows_for("SELECT x, llm(x) FROM v LIMIT 2;").await;
    assert_eq!((rows.len(), n), (2, 2));
    for r in rows {
        let (x, y) = r.split_once(" | ").unwrap();
        assert_eq!(y, answer(x), "each row carries its own answer");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_by_limit_calls_only_the_rows_kept() {
    // The sort key does not depend on the call: 2 calls, not 5, and the rows keep their order.
    let (rows, n) = rows_for("SELECT x, llm(x) FROM v ORDER BY x DESC LIMIT 2;").await;
    let expected: Vec<String> = ["gamma", "epsilon"]
        .iter()
        .map(|x| format!("{x} | {}", answer(x)))
        .collect();
    assert_eq!((rows, n), (expected, 2));
    // A key not in the select list, with an OFFSET.
    let (rows, n) = rows_for("SELECT llm(x) FROM v ORDER BY n LIMIT 2 OFFSET 1;").await;
    assert_eq!((rows, n), (vec![answer("beta"), answer("gamma")], 2));
    // Ordered by the call itself, every row must be answered.
    let (rows, n) = rows_for("SELECT x FROM v ORDER BY llm(x) LIMIT 2;").await;
    assert_eq!((rows.len(), n), (2, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_text_in_sql_feeds_llm_calls() {
    let (rows, n) = rows_for(
        "SELECT p, llm(p) FROM (SELECT unnest(chunk_text(x || '. ' || x || ' again.', 8)) AS p \
         FROM v);",
    )
    .await;
    // alpha. alpha again. -> "alpha.", "alpha", "again." ...: every chunk within 8 characters,
    // each with its own answer.
    assert!(rows.len() >= 10, "{rows:?}");
    for r in &rows {
        let (p, y) = r.split_once(" | ").unwrap();
        assert!(p.chars().count() <= 8, "{p:?}");
        assert_eq!(y, answer(p));
    }
    // Identical chunks ("again.") are sent once.
    let distinct: std::collections::HashSet<&String> = rows.iter().collect();
    assert_eq!(
        n,
        distinct.len() as u64,
        "{n} requests for {} distinct",
        distinct.len()
    );
}
