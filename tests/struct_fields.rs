//! Fields of the structs LLM functions return: an aggregate's object value and its error struct
//! take `['field']`, `get_field` and access through a subquery like any struct; a field of a
//! NULL struct is NULL, also when sluice reads its own Parquet output back. Each query is
//! checked for the calls it makes, not only for its rows.

mod support;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use support::*;

/// An aggregate whose value is an object: a title and a count per group.
const SUMM_FN: &str = r#"
name = "summ"
kind = "aggregate"
args = ["xs"]
prompt = """Title these values.
{% for x in xs %}- {{ x }}
{% endfor %}"""
output = { type = "object", properties = { title = { type = "string" }, n = { type = "integer" } }, required = ["title", "n"] }
"#;

/// Three groups of three values each.
const GROUPS: &str = "CREATE VIEW t AS SELECT value % 3 AS g, 'value ' || CAST(value AS VARCHAR) AS x \
                      FROM generate_series(1, 9)";

/// The rows of a two-column result as "g|v" strings, sorted (v: a string column or NULL).
fn pairs(batches: &[RecordBatch], value: &str) -> Vec<String> {
    let mut out = vec![];
    for b in batches {
        let g = b.column_by_name("g").expect("g");
        let v = b.column_by_name(value).expect("value column");
        let formatter = |a: &dyn Array, i: usize| {
            datafusion::arrow::util::display::array_value_to_string(a, i).expect("displays")
        };
        for i in 0..b.num_rows() {
            let shown = if v.is_null(i) {
                "NULL".to_string()
            } else {
                formatter(v.as_ref(), i)
            };
            out.push(format!("{}|{shown}", formatter(g.as_ref(), i)));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_of_an_aggregates_struct_value_and_error_plan_and_call_once_per_group() {
    let s = mock(MockConfig::default()).await;
    let e = engine_with(&s, &[SUMM_FN]);
    run(&e, GROUPS).await.unwrap();
    // The whole struct, as the reference for its fields.
    let whole = e
        .query("SELECT g, summ(x ORDER BY x) AS s FROM t GROUP BY g")
        .await
        .unwrap();
    assert_eq!(s.stats().requests, 3, "one call per group");
    let mut titles = vec![];
    for b in &whole {
        let g = b.column_by_name("g").unwrap();
        let st = b.column_by_name("s").unwrap().as_struct();
        let title = st.column_by_name("title").unwrap().as_string::<i32>();
        for i in 0..b.num_rows() {
            let g = datafusion::arrow::util::display::array_value_to_string(g, i).unwrap();
            titles.push(format!("{g}|{}", title.value(i)));
        }
    }
    titles.sort();
    assert_eq!(titles.len(), 3);

    let field_queries = [
        "SELECT g, summ(x ORDER BY x)['title'] AS v FROM t GROUP BY g",
        "SELECT g, get_field(summ(x ORDER BY x), 'title') AS v FROM t GROUP BY g",
        "SELECT g, s['title'] AS v FROM (SELECT g, summ(x ORDER BY x) AS s FROM t GROUP BY g)",
        "SELECT g, v FROM (SELECT g, summ(x ORDER BY x)['title'] AS v FROM t GROUP BY g) \
         WHERE v IS NOT NULL",
    ];
    for sql in field_queries {
        s.reset_stats();
        let got = e
            .query(sql)
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"));
        assert_eq!(pairs(&got, "v"), titles, "{sql}");
        // The same calls as the whole struct: answered by this run's identical calls, or sent
        // once per group — never more.
        assert!(s.stats().requests <= 3, "{sql}: {}", s.stats().requests);
    }

    // The error struct's fields: NULL for every group (all succeeded), whatever the access.
    for sql in [
        "SELECT g, summ_error(x ORDER BY x)['kind'] AS v FROM t GROUP BY g",
        "SELECT g, get_field(summ_error(x ORDER BY x), 'message') AS v FROM t GROUP BY g",
        "SELECT g, err['attempts'] AS v FROM \
         (SELECT g, summ_error(x ORDER BY x) AS err FROM t GROUP BY g)",
    ] {
        let got = e
            .query(sql)
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"));
        assert_eq!(
            pairs(&got, "v"),
            ["0|NULL", "1|NULL", "2|NULL"],
            "{sql}: no group failed"
        );
    }
    assert_eq!(
        s.stats().requests,
        0,
        "the error faces share the value's calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_of_a_null_error_struct_read_back_from_parquet_is_null() {
    let marker = "FAILS-ALWAYS";
    let s = mock(MockConfig {
        permanent: vec![(marker.to_string(), Fault::Server500)],
        ..MockConfig::default()
    })
    .await;
    let e = engine_with(
        &s,
        &[r#"
name = "echo"
args = ["x"]
prompt = "Say {{ x }}"
"#],
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.parquet");
    let sql = format!(
        "COPY (SELECT x, echo(x) AS a, echo_error(x) AS a_error FROM \
         (VALUES ('one'), ('two'), ('{marker}')) AS v(x)) TO '{}' STORED AS PARQUET;\n\
         CREATE EXTERNAL TABLE back STORED AS PARQUET LOCATION '{}';",
        out.display(),
        out.display()
    );
    run(&e, &sql).await.unwrap();
    let got = e
        .query(
            "SELECT x, a_error['kind'] AS kind, a_error['http_status'] AS status, \
             a_error IS NULL AS ok FROM back ORDER BY x",
        )
        .await
        .unwrap();
    assert_eq!(
        ordered_rows(&got),
        [
            format!("{marker} | server_error | 500 | false"),
            "one | NULL | NULL | true".to_string(),
            "two | NULL | NULL | true".to_string(),
        ],
        "a field of a NULL struct is NULL; a failed row keeps its kind"
    );
    let failed = e
        .query("SELECT count(*) AS n FROM back WHERE a_error['kind'] IS NOT NULL")
        .await
        .unwrap();
    assert_eq!(
        ordered_rows(&failed),
        ["1"],
        "only the failed row has a kind"
    );
}
