//! Where LLM calls land in a plan, pinned: the optimized logical plan of the flagship and of
//! each SQL position, as `EXPLAIN` prints it, in snapshot files (`tests/snapshots/plans__*.snap`).
//! A change to the planner that moves a call (below or above a filter, a sort, a limit) shows
//! as a failing test with the diff of the plan text. When the change is meant, rewrite the pins
//! with `INSTA_UPDATE=always cargo test --test plans` and review `git diff tests/snapshots`.

mod support;

use support::*;

const PROFILE: &str = PROFILE_FN;

const SETUP: &str = "CREATE TABLE t AS VALUES ('alpha', 1), ('beta', 2), ('gamma', 3);\n\
                     CREATE VIEW v AS SELECT column1 AS x, column2 AS n FROM t;\n";

/// The optimized logical plan of `sql` after `setup`, one node a line, trailing spaces cut.
async fn logical_plan(engine: &sluice::Engine, setup: &str, sql: &str) -> String {
    run(engine, setup).await.expect("setup");
    let batches = engine
        .query(&format!("EXPLAIN {sql}"))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let rows = ordered_rows(&batches);
    let plan = rows
        .iter()
        .find_map(|r| r.strip_prefix("logical_plan | "))
        .unwrap_or_else(|| panic!("no logical plan in {rows:?}"));
    plan.lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
}

async fn position(sql: &str) -> String {
    let server = mock(MockConfig::default()).await;
    let engine = engine_with(&server, &[PROFILE]);
    let plan = logical_plan(&engine, SETUP, sql).await;
    assert_eq!(server.stats().requests, 0, "EXPLAIN calls no model");
    plan
}

/// The flagship's answer stage (the SELECT its COPY writes), over its views.
async fn flagship_plan() -> String {
    let server = mock(MockConfig::default()).await;
    let engine = flagship_engine(&server, 2);
    let script = flagship_sql(
        &shared_data("earnings_transcript_excerpts.jsonl"),
        std::path::Path::new("/nonexistent/out.parquet"),
    );
    let statements = sluice::engine::split_statements(&script);
    let setup: String = statements[..3]
        .iter()
        .map(|s| format!("{};\n", s.text))
        .collect();
    let copy = &statements[3].text;
    let select = copy[copy.find("COPY (").expect("a COPY") + "COPY (".len()..]
        .split(") TO ")
        .next()
        .expect("COPY (SELECT ...) TO");
    let plan = logical_plan(&engine, &setup, select).await;
    assert_eq!(server.stats().requests, 0, "EXPLAIN calls no model");
    plan
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_list() {
    insta::assert_snapshot!(position("SELECT x, llm(x) AS y FROM v").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_after_the_cheap_predicate() {
    insta::assert_snapshot!(position("SELECT x FROM v WHERE llm(x) LIKE 'A%' AND n > 1").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sort_key() {
    insta::assert_snapshot!(position("SELECT x FROM v ORDER BY llm(x)").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_over_a_topk() {
    // The sort key does not depend on the call: the TopK runs first, and only the rows it keeps
    // are sent to the model.
    insta::assert_snapshot!(position("SELECT x, llm(x) FROM v ORDER BY x DESC LIMIT 2").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_below_the_calls() {
    // The rows an OFFSET skips are not sent either.
    insta::assert_snapshot!(position("SELECT llm(x) FROM v ORDER BY n LIMIT 2 OFFSET 1").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sort_on_a_call_stays_above_it() {
    insta::assert_snapshot!(position("SELECT x, llm(x) FROM v ORDER BY llm(x) LIMIT 2").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_below_the_calls() {
    insta::assert_snapshot!(position("SELECT llm(x) FROM v LIMIT 2").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_calls_stack() {
    insta::assert_snapshot!(position("SELECT llm(llm(x)) AS y FROM v").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_by_key() {
    insta::assert_snapshot!(position("SELECT llm(x) AS k, count(*) FROM v GROUP BY llm(x)").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_and_error_faces_share_one_call() {
    insta::assert_snapshot!(
        position("SELECT profile(x)['a'] AS a, profile_error(x) AS e FROM v").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagship_stages() {
    // Each stage's LlmNode sits right above what it reads: answers over the unnested
    // questions, questions over the unnested passages.
    insta::assert_snapshot!(flagship_plan().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_condition_calls_over_the_pairs_its_equality_keeps() {
    // The equality stays in the join; the LLM part is a lifted call over the pairs, marked as a
    // join condition (it counts them before any call).
    insta::assert_snapshot!(
        position("SELECT a.x FROM v a JOIN v b ON a.n = b.n AND llm(a.x || b.x) = 'yes'").await
    );
}
