//! Where LLM calls land in a plan, pinned: the optimized logical plan of the flagship and of
//! each SQL position, as `EXPLAIN` prints it. A change to the planner that moves a call (below
//! or above a filter, a sort, a limit) shows here as a diff of the plan text.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints every plan, for updating the pins: cargo test --test plans -- --ignored --nocapture"]
async fn print_all() {
    for sql in [
        "SELECT x, llm(x) AS y FROM v",
        "SELECT x FROM v WHERE llm(x) LIKE 'A%' AND n > 1",
        "SELECT x FROM v ORDER BY llm(x)",
        "SELECT x, llm(x) FROM v ORDER BY x DESC LIMIT 2",
        "SELECT llm(x) FROM v LIMIT 2",
        "SELECT llm(x) FROM v ORDER BY n LIMIT 2 OFFSET 1",
        "SELECT llm(llm(x)) AS y FROM v",
        "SELECT llm(x) AS k, count(*) FROM v GROUP BY llm(x)",
        "SELECT profile(x)['a'] AS a, profile_error(x) AS e FROM v",
        "SELECT a.x FROM v a JOIN v b ON a.n = b.n AND llm(a.x || b.x) = 'yes'",
    ] {
        println!("=== {sql}\n{}\n", position(sql).await);
    }
    println!("=== flagship\n{}", flagship_plan().await);
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
    let expected = r#"
Projection: v.x, __sluice_llm_1 AS y
  LlmNode: __sluice_llm_1 := llm(v.x)
    SubqueryAlias: v
      Projection: t.column1 AS x
        TableScan: t projection=[column1]"#;
    assert_eq!(
        position("SELECT x, llm(x) AS y FROM v").await,
        expected.trim_start_matches('\n')
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_after_the_cheap_predicate() {
    let expected = r#"
SubqueryAlias: v
  Projection: t.column1 AS x
    Filter: __sluice_llm_1 LIKE Utf8("A%")
      Projection: t.column1, __sluice_llm_1
        LlmNode: __sluice_llm_1 := llm(t.column1)
          Filter: t.column2 > Int64(1)
            TableScan: t projection=[column1, column2]"#;
    assert_eq!(
        position("SELECT x FROM v WHERE llm(x) LIKE 'A%' AND n > 1").await,
        expected.trim_start_matches('\n')
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sort_key() {
    let expected = r#"
Projection: v.x
  Sort: __sluice_llm_1 AS llm(v.x) ASC NULLS LAST
    Projection: v.x, __sluice_llm_1
      LlmNode: __sluice_llm_1 := llm(v.x)
        SubqueryAlias: v
          Projection: t.column1 AS x
            TableScan: t projection=[column1]"#;
    assert_eq!(
        position("SELECT x FROM v ORDER BY llm(x)").await,
        expected.trim_start_matches('\n')
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_over_a_topk() {
    // The sort key does not depend on the call: the TopK runs first, and only the rows it keeps
    // are sent to the model.
    let expected = r#"
Projection: v.x, __sluice_llm_1 AS llm(v.x)
  LlmNode: __sluice_llm_1 := llm(v.x)
    Sort: v.x DESC NULLS FIRST, fetch=2
      SubqueryAlias: v
        Projection: t.column1 AS x
          TableScan: t projection=[column1]"#;
    assert_eq!(
        position("SELECT x, llm(x) FROM v ORDER BY x DESC LIMIT 2").await,
        expected.trim_start_matches('\n')
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_below_the_calls() {
    // The rows an OFFSET skips are not sent either.
    let expected = r#"
Projection: __sluice_llm_1 AS llm(v.x)
  LlmNode: __sluice_llm_1 := llm(v.x)
    Limit: skip=1, fetch=2
      Sort: v.n ASC NULLS LAST, fetch=3
        SubqueryAlias: v
          Projection: t.column1 AS x, t.column2 AS n
            TableScan: t projection=[column1, column2]"#;
    assert_eq!(
        position("SELECT llm(x) FROM v ORDER BY n LIMIT 2 OFFSET 1").await,
        expected.trim_start_matches('\n')
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sort_on_a_call_stays_above_it() {
    let expected = r#"
Sort: llm(v.x) ASC NULLS LAST, fetch=2
  Projection: v.x, __sluice_llm_1 AS llm(v.x)
    LlmNode: __sluice_llm_1 := llm(v.x)
      SubqueryAlias: v
        Projection: t.column1 AS x
          TableScan: t projection=[column1]"#;
    assert_eq!(
        position("SELECT x, llm(x) FROM v ORDER BY llm(x) LIMIT 2").await,
        expected.trim_start_matches('\n')
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_below_the_calls() {
    let expected = r#"
Projection: __sluice_llm_1 AS llm(v.x)
  LlmNode: __sluice_llm_1 := llm(v.x)
    SubqueryAlias: v
      Projection: t.column1 AS x
        Limit: skip=0, fetch=2
          TableScan: t projection=[column1], fetch=2"#;
    assert_eq!(
        position("SELECT llm(x) FROM v LIMIT 2").await,
        expected.trim_start_matches('\n')
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_calls_stack() {
    let expected = r#"
Projection: __sluice_llm_2 AS y
  LlmNode: __sluice_llm_2 := llm(__sluice_llm_1)
    LlmNode: __sluice_llm_1 := llm(v.x)
      SubqueryAlias: v
        Projection: t.column1 AS x
          TableScan: t projection=[column1]"#;
    assert_eq!(
        position("SELECT llm(llm(x)) AS y FROM v").await,
        expected.trim_start_matches('\n')
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_by_key() {
    let expected = r#"
Projection: llm(v.x) AS k, count(Int64(1)) AS count(*)
  Aggregate: groupBy=[[__sluice_llm_1 AS llm(v.x)]], aggr=[[count(Int64(1))]]
    Projection: __sluice_llm_1
      LlmNode: __sluice_llm_1 := llm(v.x)
        SubqueryAlias: v
          Projection: t.column1 AS x
            TableScan: t projection=[column1]"#;
    assert_eq!(
        position("SELECT llm(x) AS k, count(*) FROM v GROUP BY llm(x)").await,
        expected.trim_start_matches('\n')
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_and_error_faces_share_one_call() {
    let expected = r#"
Projection: get_field(__sluice_llm_1, Utf8("a")) AS a, __sluice_llm_1_error AS e
  LlmNode: __sluice_llm_1 := profile(v.x)
    SubqueryAlias: v
      Projection: t.column1 AS x
        TableScan: t projection=[column1]"#;
    assert_eq!(
        position("SELECT profile(x)['a'] AS a, profile_error(x) AS e FROM v").await,
        expected.trim_start_matches('\n')
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagship_stages() {
    // Each stage's LlmNode sits right above what it reads: answers over the unnested
    // questions, questions over the unnested passages.
    let expected = r#"
Projection: questions.ticker AS company, questions.quarter, questions.date, questions.passage, questions.question, __sluice_llm_2 AS answer, questions.question_error, __sluice_llm_2_error AS answer_error
  LlmNode: __sluice_llm_2 := answer_question(questions.ticker, questions.quarter, questions.date, questions.passage, questions.question)
    SubqueryAlias: questions
      Projection: passages.ticker, passages.quarter, passages.date, passages.passage, __unnest_placeholder(generate_questions(passages.ticker,passages.quarter,passages.date,passages.passage),depth=1) AS UNNEST(generate_questions(passages.ticker,passages.quarter,passages.date,passages.passage)) AS question, question_error
        Unnest: lists[__unnest_placeholder(generate_questions(passages.ticker,passages.quarter,passages.date,passages.passage))|depth=1] structs[]
          Projection: passages.ticker, passages.quarter, passages.date, passages.passage, __sluice_llm_1 AS __unnest_placeholder(generate_questions(passages.ticker,passages.quarter,passages.date,passages.passage)), __sluice_llm_1_error AS question_error
            LlmNode: __sluice_llm_1 := generate_questions(passages.ticker, passages.quarter, passages.date, passages.passage)
              SubqueryAlias: passages
                Projection: transcripts.ticker, quarter, transcripts.date, __unnest_placeholder(chunk_text(transcripts.transcript,Int64(4096)),depth=1) AS UNNEST(chunk_text(transcripts.transcript,Int64(4096))) AS passage
                  Unnest: lists[__unnest_placeholder(chunk_text(transcripts.transcript,Int64(4096)))|depth=1] structs[]
                    Projection: transcripts.ticker, transcripts.q AS quarter, transcripts.date, chunk_text(transcripts.transcript, Int64(4096)) AS __unnest_placeholder(chunk_text(transcripts.transcript,Int64(4096)))
                      TableScan: transcripts projection=[ticker, q, date, transcript]"#;
    assert_eq!(flagship_plan().await, expected.trim_start_matches('\n'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_condition_calls_over_the_pairs_its_equality_keeps() {
    // The equality stays in the join; the LLM part is a lifted call over the pairs, marked as a
    // join condition (it counts them before any call).
    let expected = r#"
Projection: a.x
  Filter: __sluice_llm_1 = Utf8("yes")
    Projection: a.x, __sluice_llm_1
      LlmNode: __sluice_llm_1 := llm(a.x || b.x) (join condition)
        Inner Join: a.n = b.n
          SubqueryAlias: a
            SubqueryAlias: v
              Projection: t.column1 AS x, t.column2 AS n
                TableScan: t projection=[column1, column2]
          SubqueryAlias: b
            SubqueryAlias: v
              Projection: t.column1 AS x, t.column2 AS n
                TableScan: t projection=[column1, column2]"#;
    assert_eq!(
        position("SELECT a.x FROM v a JOIN v b ON a.n = b.n AND llm(a.x || b.x) = 'yes'").await,
        expected.trim_start_matches('\n')
    );
}
