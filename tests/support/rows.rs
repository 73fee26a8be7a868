//! The flagship's rows read back from Parquet, and the check that each row's question and
//! answer were made from that row's own prompts.

use datafusion::arrow::array::RecordBatch;
use minijinja::Value;

use super::{prompt_hash, strings};

/// One output row of the flagship.
pub struct Row {
    pub company: String,
    pub quarter: String,
    pub date: String,
    pub passage: String,
    pub question: Option<String>,
    pub answer: Option<String>,
}

/// The rows of the flagship's output.
pub fn rows(batches: &[RecordBatch]) -> Vec<Row> {
    let c = strings(batches, "company");
    let q = strings(batches, "quarter");
    let d = strings(batches, "date");
    let p = strings(batches, "passage");
    let qs = strings(batches, "question");
    let a = strings(batches, "answer");
    (0..c.len())
        .map(|i| Row {
            company: c[i].clone().unwrap(),
            quarter: q[i].clone().unwrap(),
            date: d[i].clone().unwrap(),
            passage: p[i].clone().unwrap(),
            question: qs[i].clone(),
            answer: a[i].clone(),
        })
        .collect()
}

/// Rows as sorted lines, for comparing outputs made in different orders.
pub fn sorted_lines(rows: Vec<Row>) -> Vec<String> {
    let mut out: Vec<String> = rows
        .into_iter()
        .map(|r| {
            format!(
                "{}|{}|{}|{}|{:?}|{:?}",
                r.company, r.quarter, r.date, r.passage, r.question, r.answer
            )
        })
        .collect();
    out.sort();
    out
}

/// The mock tags every answer with the hash of its prompt; recompute the prompts from each row
/// with the shipped templates and check both stages belong to this row.
pub fn assert_provenance(engine: &sluice::Engine, r: &Row) {
    let gen_def = engine.function("generate_questions").unwrap();
    let ans_def = engine.function("answer_question").unwrap();
    let meta = [
        Value::from(r.company.as_str()),
        Value::from(r.quarter.as_str()),
        Value::from(r.date.as_str()),
        Value::from(r.passage.as_str()),
    ];
    let gp = gen_def.render(&meta).unwrap();
    let h1 = prompt_hash(gp.system.as_deref(), &gp.user);
    let question = r.question.as_ref().expect("question present");
    assert!(
        question.contains(&format!("[{h1}]")),
        "question {question:?} is not from its passage (hash {h1})"
    );
    let mut args = meta.to_vec();
    args.push(Value::from(question.as_str()));
    let ap = ans_def.render(&args).unwrap();
    let h2 = prompt_hash(ap.system.as_deref(), &ap.user);
    let answer = r.answer.as_ref().expect("answer present");
    assert!(
        answer.contains(&format!("[{h2}]")),
        "answer {answer:?} does not answer its own question (hash {h2})"
    );
}
