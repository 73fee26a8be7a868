//! One slice of rows through its LLM calls: render each row's prompt from its arguments, hand
//! the prompts to the function's [`FunctionCaller`], and turn the results into a value column
//! (typed by the output schema), an error column and a model column per call.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion::arrow::array::{Array, ArrayRef, StringArray};
use datafusion::arrow::array::{StringBuilder, StructArray, UInt16Array, UInt32Array};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result};
use minijinja::Value as JinjaValue;
use serde_json::Value;

use super::call::PhysicalCall;
use super::cascade::{Stage, answer};
use super::def::{FunctionDef, OnError};
use super::face::{ERROR_TYPE, value_type};
use super::values::{StrColumn, to_template_values};
use crate::llm::dispatch::{CallResult, Packer};
use crate::types::{ErrorKind, RenderedPrompt, RowError, StatementStop};

/// What every slice of one stream shares.
pub(super) struct SliceContext {
    /// The calls, in output column order.
    pub calls: Vec<Arc<PhysicalCall>>,
    /// The models of each call (one, or its cascade's).
    pub callers: Vec<Vec<Stage>>,
    /// The output schema (input columns, then value, error and model per call).
    pub schema: SchemaRef,
}

fn no_call(kind: ErrorKind, message: String) -> CallResult {
    Err(Arc::new(RowError::without_call(kind, message)))
}

/// Each row's prompt, or the result of a row that cannot be called (a NULL argument, a template
/// error). Plain templates over string columns render straight from the Arrow buffers.
fn render_rows(
    def: &FunctionDef,
    arrays: &[ArrayRef],
    n: usize,
) -> Vec<std::result::Result<RenderedPrompt, CallResult>> {
    let null_arg = |i: usize| {
        no_call(
            ErrorKind::NullInput,
            format!("argument {:?} is NULL; no call was made", def.args[i]),
        )
    };
    let plain = def.plain_templates().and_then(|plain| {
        let strs: Option<Vec<StrColumn>> = arrays.iter().map(StrColumn::of).collect();
        Some((plain, strs?))
    });
    if let Some((plain, strs)) = plain {
        let mut values: Vec<&str> = Vec::with_capacity(strs.len());
        return (0..n)
            .map(|row| {
                values.clear();
                for (i, col) in strs.iter().enumerate() {
                    values.push(col.get(row).ok_or_else(|| null_arg(i))?);
                }
                Ok(plain.render(&values))
            })
            .collect();
    }
    let columns: Vec<Vec<Option<JinjaValue>>> = arrays.iter().map(to_template_values).collect();
    let mut values = Vec::with_capacity(columns.len());
    (0..n)
        .map(|row| {
            values.clear();
            for (i, col) in columns.iter().enumerate() {
                values.push(col[row].clone().ok_or_else(|| null_arg(i))?);
            }
            def.render(&values)
                .map_err(|e| no_call(ErrorKind::Template, e))
        })
        .collect()
}

/// One call's result for every row of `batch`, with the stage of `stages` that gave it (none
/// for a row that could not be called).
async fn run_call(
    call: &PhysicalCall,
    stages: &[Stage],
    batch: &RecordBatch,
    progress: &AtomicUsize,
) -> Result<Vec<(CallResult, Option<usize>)>> {
    let caller = &stages[0].caller;
    let n = batch.num_rows();
    let arrays: Vec<ArrayRef> = call
        .args
        .iter()
        .map(|e| e.evaluate(batch)?.into_array(n))
        .collect::<Result<_>>()?;
    // Rows that cannot be called get their error now; the rest go to the dispatcher.
    let mut rendered = render_rows(&call.def, &arrays, n);
    if let Some(budget) = call.def.kind.reduce() {
        // Groups over an aggregate's budget take their reduction tree instead.
        super::aggregate::reduce_oversized(
            &call.def,
            budget,
            caller,
            &arrays,
            &mut rendered,
            progress,
        )
        .await;
    }
    drop(arrays);
    let mut results: Vec<Option<(CallResult, Option<usize>)>> = Vec::with_capacity(n);
    let mut prompts = Vec::with_capacity(n);
    let mut rows = Vec::with_capacity(n);
    let mut items = Vec::new();
    for (row, r) in rendered.into_iter().enumerate() {
        // A packed function's row renders its item; the row alone is the shared prompt
        // with that one item (its key, whatever the packing).
        let r = match (call.def.kind.packing(), r) {
            (Some(pack), Ok(item)) => pack
                .render(&[&item.user])
                .map(|alone| (alone, Some(item.user)))
                .map_err(|e| no_call(ErrorKind::Template, e)),
            (None, r) => r.map(|prompt| (prompt, None)),
            (_, Err(e)) => Err(e),
        };
        match r {
            Ok((prompt, item)) => {
                prompts.push(prompt);
                items.extend(item);
                rows.push(row);
                results.push(None);
            }
            Err(no_call) => results.push(Some((no_call, None))),
        }
    }
    let skipped = n - prompts.len();
    progress.fetch_add(skipped, Ordering::Relaxed);
    caller
        .metrics()
        .rows_finished
        .fetch_add(skipped as u64, Ordering::Relaxed);
    let items = call.def.kind.packing().is_some().then_some(items);
    let answers = answer(stages, prompts, items, progress).await;
    for (row, (r, stage)) in rows.into_iter().zip(answers) {
        results[row] = Some((r, Some(stage)));
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every row has its result"))
        .collect())
}

/// The slice with each call's value, error and model columns appended.
pub(super) async fn process_slice(
    ctx: &SliceContext,
    batch: RecordBatch,
    progress: &AtomicUsize,
) -> Result<RecordBatch> {
    let per_call = futures::future::try_join_all(
        ctx.calls
            .iter()
            .zip(&ctx.callers)
            .map(|(c, caller)| run_call(c, caller, &batch, progress)),
    )
    .await?;
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    for ((call, stages), answered) in ctx.calls.iter().zip(&ctx.callers).zip(per_call) {
        let (results, by): (Vec<CallResult>, Vec<Option<usize>>) = answered.into_iter().unzip();
        let models: Vec<Option<&str>> = by
            .iter()
            .map(|s| s.map(|s| stages[s].model.as_str()))
            .collect();
        check_statement_errors(call, &results, &models)?;
        columns.push(value_array(&call.def, &results)?);
        columns.push(error_array(&results, &models));
        let answered: StringArray = results
            .iter()
            .zip(&models)
            .map(|(r, m)| r.as_ref().ok().and(*m))
            .collect();
        columns.push(Arc::new(answered));
    }
    Ok(RecordBatch::try_new(ctx.schema.clone(), columns)?)
}

/// Any systemic failure (the model is unreachable, refuses the key, ...) fails the statement,
/// whichever rows it hit first; so does any failed row under on_error = "fail".
fn check_statement_errors(
    call: &PhysicalCall,
    results: &[CallResult],
    models: &[Option<&str>],
) -> Result<()> {
    let def = &call.def;
    let mut errors = results.iter().filter_map(|r| r.as_ref().err());
    let systemic = results.iter().zip(models).find_map(|(r, m)| {
        r.as_ref()
            .err()
            .filter(|e| e.kind.is_systemic())
            .map(|e| (e, m))
    });
    if let Some((e, model)) = systemic {
        let stop = match e.kind {
            ErrorKind::Budget => StatementStop::Budget,
            _ => StatementStop::Model,
        };
        // A cascade's model by its name; a lone model by its endpoint, as before.
        let model = match (call.cascade.is_empty(), model) {
            (false, Some(name)) => format!("{name:?}"),
            _ => format!("{:?}", call.model.provider.endpoint()),
        };
        return Err(stop.fail(DataFusionError::Execution(format!(
            "{}(): model {model} failed: {e}",
            def.name
        ))));
    }
    if def.on_error == OnError::Fail
        && let Some(e) = errors.find(|e| e.kind != ErrorKind::NullInput)
    {
        return Err(StatementStop::Row.fail(DataFusionError::Execution(format!(
            "{}() failed for a row (on_error = \"fail\" in {}): {e}",
            def.name,
            def.source.display()
        ))));
    }
    Ok(())
}

fn value_array(def: &FunctionDef, results: &[CallResult]) -> Result<ArrayRef> {
    match &def.output {
        Some(schema) => {
            let values: Vec<Option<&Value>> = results
                .iter()
                .map(|r| r.as_ref().ok().map(|v| v.as_ref()))
                .collect();
            schema.to_array(&values).map_err(|e| {
                DataFusionError::Execution(format!(
                    "{}(): cannot convert responses to {}: {e}",
                    def.name,
                    value_type(def)
                ))
            })
        }
        None => {
            let arr: StringArray = results
                .iter()
                .map(|r| r.as_ref().ok().and_then(|v| v.as_str().map(str::to_string)))
                .collect();
            Ok(Arc::new(arr))
        }
    }
}

/// The error structs of `results`, each naming the model its call failed on (`models`).
fn error_array(results: &[CallResult], models: &[Option<&str>]) -> ArrayRef {
    let n = results.len();
    let mut kind = StringBuilder::with_capacity(n, n * 8);
    let mut message = StringBuilder::with_capacity(n, n * 32);
    let mut attempts = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut finish = StringBuilder::with_capacity(n, n);
    let mut model = StringBuilder::with_capacity(n, n);
    let mut valid = Vec::with_capacity(n);
    for (r, m) in results.iter().zip(models) {
        match r {
            Ok(_) => {
                // Children are NULL too, so `e['kind']` of a success is NULL, not "".
                kind.append_null();
                message.append_null();
                attempts.push(None);
                status.push(None);
                finish.append_null();
                model.append_null();
                valid.push(false);
            }
            Err(e) => {
                kind.append_value(e.kind.as_str());
                message.append_value(&e.message);
                attempts.push(Some(e.attempts));
                status.push(e.http_status);
                finish.append_option(e.finish_reason.as_deref());
                model.append_option(*m);
                valid.push(true);
            }
        }
    }
    let DataType::Struct(fields) = ERROR_TYPE.clone() else {
        unreachable!("ERROR_TYPE is a struct")
    };
    let arrays: Vec<ArrayRef> = vec![
        Arc::new(kind.finish()),
        Arc::new(message.finish()),
        Arc::new(UInt32Array::from(attempts)),
        Arc::new(UInt16Array::from(status)),
        Arc::new(finish.finish()),
        Arc::new(model.finish()),
    ];
    let nulls = NullBuffer::from(valid);
    let arr = StructArray::new(fields, arrays, Some(nulls));
    debug_assert_eq!(arr.len(), n);
    Arc::new(arr)
}
