//! Sources: files → Arrow (DataFusion listing tables for JSONL, CSV, Parquet) and the text
//! functions that prepare passages, such as `chunk_text`.

pub(crate) mod chunk;
pub mod corpus;
pub mod lines;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, ListBuilder, StringBuilder};
use datafusion::arrow::datatypes::{DataType, Field};
use datafusion::common::{Result, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// `chunk_text(text, max_chars [, overlap_chars])` → `List<Utf8>`: passages of at most
/// `max_chars` characters, cut at paragraph, then sentence, then word boundaries. Use it with
/// `unnest(...)` to get one row per passage.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct ChunkText {
    signature: Signature,
}

impl Default for ChunkText {
    fn default() -> Self {
        ChunkText {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ChunkText {
    /// The SQL function.
    pub fn udf() -> ScalarUDF {
        ScalarUDF::new_from_impl(ChunkText::default())
    }
}

fn is_text(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Null
    )
}

impl ScalarUDFImpl for ChunkText {
    fn name(&self) -> &str {
        "chunk_text"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        if !(2..=3).contains(&arg_types.len()) {
            return plan_err!(
                "chunk_text(text, max_chars [, overlap_chars]) takes 2 or 3 arguments, got {}",
                arg_types.len()
            );
        }
        if !is_text(&arg_types[0]) {
            return plan_err!(
                "chunk_text: the first argument must be text, got {}",
                arg_types[0]
            );
        }
        let mut out = vec![DataType::Utf8];
        for t in &arg_types[1..] {
            if !(t.is_integer() || t == &DataType::Null) {
                return plan_err!(
                    "chunk_text: max_chars and overlap_chars must be integers, got {t}"
                );
            }
            out.push(DataType::Int64);
        }
        Ok(out)
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::List(Arc::new(Field::new(
            "item",
            DataType::Utf8,
            true,
        ))))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let arrays: Vec<ArrayRef> = args
            .args
            .iter()
            .map(|a| a.to_array(n))
            .collect::<Result<_>>()?;
        let text = arrays[0].as_string::<i32>();
        let max = arrays[1].as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        let overlap = arrays
            .get(2)
            .map(|a| a.as_primitive::<datafusion::arrow::datatypes::Int64Type>());
        let mut builder = ListBuilder::new(StringBuilder::new());
        for i in 0..n {
            if text.is_null(i) || max.is_null(i) {
                builder.append_null();
                continue;
            }
            let m = max.value(i);
            let o = overlap
                .map(|o| if o.is_null(i) { 0 } else { o.value(i) })
                .unwrap_or(0);
            if m <= 0 || o < 0 {
                return exec_err!(
                    "chunk_text: max_chars must be positive and overlap_chars non-negative, got \
                     {m} and {o}"
                );
            }
            match chunk::chunk_text(text.value(i), m as usize, o as usize) {
                Ok(chunks) => {
                    for c in chunks {
                        builder.values().append_value(c);
                    }
                    builder.append(true);
                }
                Err(e) => return exec_err!("chunk_text: {e}"),
            }
        }
        Ok(ColumnarValue::Array(Arc::new(builder.finish())))
    }
}

/// DataFusion reads only `*.json` files from a JSON table's directory. Newline-delimited JSON is
/// usually named `.jsonl` or `.ndjson`: for a local directory that holds such files and no
/// `.json` file, returns the location with the matching glob (`dir/*.jsonl`).
pub(crate) fn json_lines_glob(location: &str) -> Option<String> {
    let raw = location.strip_prefix("file://").unwrap_or(location);
    if raw.contains(['*', '?', '[']) || !Path::new(raw).is_dir() {
        return None;
    }
    let names = std::fs::read_dir(raw)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string());
    json_lines_glob_for(location, names)
}

/// The glob that selects the JSON-lines files of a directory (or object-store prefix) holding
/// the files `names`: `location/*.jsonl` or `location/*.ndjson` when there is no `.json` file
/// (DataFusion's JSON reader looks only for `.json`); `None` when nothing needs changing.
pub(crate) fn json_lines_glob_for(
    location: &str,
    names: impl IntoIterator<Item = String>,
) -> Option<String> {
    if location.contains(['*', '?', '[']) {
        return None;
    }
    let mut exts = std::collections::BTreeSet::new();
    for name in names {
        if let Some((_, ext)) = name.rsplit_once('.') {
            exts.insert(ext.to_ascii_lowercase());
        }
    }
    if exts.contains("json") {
        return None;
    }
    let ext = ["jsonl", "ndjson"]
        .into_iter()
        .find(|e| exts.contains(*e))?;
    let sep = if location.ends_with('/') { "" } else { "/" };
    Some(format!("{location}{sep}*.{ext}"))
}

/// Looks for the first line that is not a JSON object in the JSON files under `location` and
/// returns `file:line: reason`. Used to turn a decoder error ("expected value at line 1") into a
/// message that names the file and line.
pub(crate) fn find_malformed_json_line(location: &Path) -> Option<String> {
    // For a glob, search the directory before the first wildcard.
    let text = location.to_string_lossy();
    let location = match text.find(['*', '?', '[']) {
        Some(i) => Path::new(&text[..i]).to_path_buf(),
        None => location.to_path_buf(),
    };
    let files: Vec<PathBuf> = if location.is_dir() {
        let mut v: Vec<PathBuf> = walk(&location);
        v.sort();
        v
    } else {
        vec![location.clone()]
    };
    for f in files {
        let file = std::fs::File::open(&f).ok()?;
        let reader = std::io::BufReader::new(file);
        for (i, line) in reader.split(b'\n').enumerate() {
            let Ok(line) = line else {
                return Some(format!("{}: cannot read", f.display()));
            };
            let text = match std::str::from_utf8(&line) {
                Ok(t) => t,
                Err(e) => {
                    return Some(format!("{}:{}: not valid UTF-8 ({e})", f.display(), i + 1));
                }
            };
            if text.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<serde_json::Value>(text) {
                Ok(serde_json::Value::Object(_)) => {}
                Ok(other) => {
                    let kind = match other {
                        serde_json::Value::Array(_) => "an array",
                        serde_json::Value::String(_) => "a string",
                        _ => "a scalar",
                    };
                    return Some(format!(
                        "{}:{}: expected one JSON object per line, found {kind}",
                        f.display(),
                        i + 1
                    ));
                }
                Err(e) => {
                    return Some(format!("{}:{}: invalid JSON ({e})", f.display(), i + 1));
                }
            }
        }
    }
    None
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else if p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.') && !n.starts_with('_'))
            {
                out.push(p);
            }
        }
    }
    out
}
