//! JSON-lines files read tolerantly. Every read of a `.json`, `.jsonl` or `.ndjson` object goes
//! through [`CleanLines`], a wrapper around its object store that rewrites each line in place,
//! keeping every byte offset (so DataFusion's parallel byte-range scans stay valid):
//!
//! - a lone UTF-16 surrogate escape (`"\ud800"`, which Python's `json.dumps` writes for broken
//!   strings) becomes `\ufffd` (U+FFFD), in every mode;
//! - with `bad_rows = 'skip'` a malformed line (not one JSON object) becomes blanks, which the
//!   JSON reader passes over; with `'null'` it becomes `{}`, a row of NULLs. Each is recorded
//!   by file and offset, and [`LineRules::report`] turns them into line numbers.
//!
//! A ranged read is widened to whole lines on both sides before the lines are judged, so every
//! read that touches a line decides the same way, wherever the scan's ranges fall.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path as ObjPath;
use object_store::{
    GetOptions, GetRange, GetResult, GetResultPayload, ObjectMeta, ObjectStore, ObjectStoreExt,
};

/// The malformed lines of one file that were skipped or read as NULLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLines {
    /// The file (a local path, or `s3://bucket/…`).
    pub file: String,
    /// What was done with them.
    pub mode: BadRows,
    /// How many.
    pub count: u64,
    /// The first few 1-based line numbers.
    pub first_lines: Vec<u64>,
}

/// How many line numbers a report names per file.
const FIRST_LINES: usize = 5;

/// How the lines of a table's files are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LineFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// CSV without newlines in values (DataFusion's default): a line is a record.
    Csv {
        /// The field delimiter.
        delimiter: u8,
        /// The quote character.
        quote: u8,
    },
}

#[derive(Debug)]
struct Rule {
    root: String,
    prefix: ObjPath,
    mode: BadRows,
    format: LineFormat,
}

#[derive(Debug)]
struct Found {
    mode: BadRows,
    store: Arc<dyn ObjectStore>,
    offsets: BTreeSet<u64>,
}

/// The `bad_rows` mode of each JSON-lines table location, and the bad lines found so far.
#[derive(Debug, Default)]
pub struct LineRules {
    rules: RwLock<Vec<Rule>>,
    found: Mutex<BTreeMap<(String, String), Found>>,
    /// Per file, the last long line a ranged read ended inside, cleaned: the reads that
    /// continue it (DataFusion asks 16 KiB at a time until the newline) are answered from here
    /// instead of each re-reading the line from its start.
    long_lines: Mutex<BTreeMap<(String, String), LongLine>>,
    /// Per CSV file, the number of fields of its first line (the header, or the first record).
    csv_fields: Mutex<BTreeMap<(String, String), usize>>,
}

#[derive(Debug, Clone)]
struct LongLine {
    start: u64,
    bytes: Bytes,
    meta: ObjectMeta,
}

impl LineRules {
    fn long_line(&self, root: &str, path: &ObjPath, range: &Range<u64>) -> Option<LongLine> {
        let lines = self.long_lines.lock().ok()?;
        let l = lines.get(&(root.to_string(), path.to_string()))?;
        let end = l.start + l.bytes.len() as u64;
        (l.start <= range.start && range.end <= end).then(|| l.clone())
    }

    fn keep_long_line(&self, root: &str, path: &ObjPath, line: LongLine) {
        if let Ok(mut lines) = self.long_lines.lock() {
            lines.insert((root.to_string(), path.to_string()), line);
        }
    }
}

impl LineRules {
    /// Sets the mode of the objects under `prefix` of the store at `root` (`file://`,
    /// `s3://bucket`), replacing an earlier rule for the same place.
    pub fn set(&self, root: &str, prefix: ObjPath, mode: BadRows, format: LineFormat) {
        if let Ok(mut rules) = self.rules.write() {
            rules.retain(|r| !(r.root == root && r.prefix == prefix));
            rules.push(Rule {
                root: root.to_string(),
                prefix,
                mode,
                format,
            });
        }
    }

    /// The rule for `path`: the one with the longest matching prefix, else `fail` for JSON.
    fn rule_for(&self, root: &str, path: &ObjPath) -> (BadRows, LineFormat) {
        let Ok(rules) = self.rules.read() else {
            return (BadRows::Fail, LineFormat::Json);
        };
        rules
            .iter()
            .filter(|r| r.root == root && path.prefix_matches(&r.prefix))
            .max_by_key(|r| r.prefix.as_ref().len())
            .map_or((BadRows::Fail, LineFormat::Json), |r| (r.mode, r.format))
    }

    /// How an object is cleaned, if it is: every JSON-lines object (lone surrogates), and CSV
    /// objects of a table that skips or nulls bad rows.
    fn cleaning(&self, root: &str, path: &ObjPath) -> Option<(BadRows, LineFormat)> {
        let (mode, format) = self.rule_for(root, path);
        match (path.extension(), format) {
            (Some("json" | "jsonl" | "ndjson"), LineFormat::Json) => Some((mode, format)),
            (Some("json" | "jsonl" | "ndjson"), _) => Some((BadRows::Fail, LineFormat::Json)),
            (Some("csv" | "tsv"), LineFormat::Csv { .. }) if mode != BadRows::Fail => {
                Some((mode, format))
            }
            _ => None,
        }
    }

    fn record(
        &self,
        root: &str,
        path: &ObjPath,
        store: &Arc<dyn ObjectStore>,
        mode: BadRows,
        offsets: &[u64],
    ) {
        if offsets.is_empty() {
            return;
        }
        if let Ok(mut found) = self.found.lock() {
            let f = found
                .entry((root.to_string(), path.to_string()))
                .or_insert_with(|| Found {
                    mode,
                    store: store.clone(),
                    offsets: BTreeSet::new(),
                });
            f.mode = mode;
            f.offsets.extend(offsets);
        }
    }

    /// The files with skipped or nulled lines, with the first line numbers (counted by reading
    /// each such file up to its fifth bad line).
    pub async fn report(&self) -> Vec<BadLines> {
        let found: Vec<_> = match self.found.lock() {
            Ok(f) => f
                .iter()
                .map(|((root, path), f)| {
                    let first: Vec<u64> = f.offsets.iter().take(FIRST_LINES).copied().collect();
                    (
                        root.clone(),
                        path.clone(),
                        f.mode,
                        f.store.clone(),
                        f.offsets.len(),
                        first,
                    )
                })
                .collect(),
            Err(_) => return vec![],
        };
        let mut out = Vec::with_capacity(found.len());
        for (root, path, mode, store, count, first) in found {
            let location = ObjPath::from(path.as_str());
            let first_lines = line_numbers(store.as_ref(), &location, &first)
                .await
                .unwrap_or_default();
            out.push(BadLines {
                // A local file as its path, anything else as its URL.
                file: match root.as_str() {
                    "file://" => format!("/{path}"),
                    _ => format!("{root}/{path}"),
                },
                mode,
                count: count as u64,
                first_lines,
            });
        }
        out
    }
}

/// The 1-based line numbers of the lines starting at `offsets` (sorted).
async fn line_numbers(
    store: &dyn ObjectStore,
    location: &ObjPath,
    offsets: &[u64],
) -> object_store::Result<Vec<u64>> {
    let Some(&last) = offsets.last() else {
        return Ok(vec![]);
    };
    let mut stream = payload_stream(
        store
            .get_opts(
                location,
                GetOptions {
                    range: Some(GetRange::Bounded(0..last + 1)),
                    ..GetOptions::default()
                },
            )
            .await?,
    );
    let (mut newlines, mut at, mut out) = (0u64, 0u64, Vec::with_capacity(offsets.len()));
    let mut next = offsets.iter().peekable();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        for (i, b) in chunk.iter().enumerate() {
            while next.peek().is_some_and(|&&o| o == at + i as u64) {
                out.push(newlines + 1);
                next.next();
            }
            newlines += u64::from(*b == b'\n');
        }
        at += chunk.len() as u64;
    }
    Ok(out)
}

/// An object store whose JSON-lines objects are read through the cleaner; everything else is
/// passed to the store it wraps.
#[derive(Debug)]
pub struct CleanLines {
    inner: Arc<dyn ObjectStore>,
    root: String,
    rules: Arc<LineRules>,
}

impl CleanLines {
    /// Wraps `inner`, the store at `root` (`file://`, `s3://bucket`).
    pub fn new(inner: Arc<dyn ObjectStore>, root: String, rules: Arc<LineRules>) -> CleanLines {
        CleanLines { inner, root, rules }
    }
}

impl fmt::Display for CleanLines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

/// Bytes asked for per read when widening a range to whole lines.
const WINDOW: u64 = 64 * 1024;

impl CleanLines {
    /// The offset where the line holding byte `at` starts.
    async fn line_start(&self, location: &ObjPath, mut at: u64) -> object_store::Result<u64> {
        while at > 0 {
            let lo = at.saturating_sub(WINDOW);
            let bytes = self.inner.get_range(location, lo..at).await?;
            if let Some(i) = memchr::memrchr(b'\n', &bytes) {
                return Ok(lo + i as u64 + 1);
            }
            at = lo;
        }
        Ok(0)
    }

    /// A `fail`-mode JSON read: lone surrogates fixed and nothing else, so no widening to
    /// whole lines (see `fix`).
    async fn get_fixed(
        &self,
        location: &ObjPath,
        mut options: GetOptions,
        asked_start: u64,
        asked_end: Option<u64>,
    ) -> object_store::Result<GetResult> {
        let start = asked_start.saturating_sub(fix::CONTEXT);
        options.range = Some(widened(start, asked_end, fix::CONTEXT));
        let result = self.inner.get_opts(location, options).await?;
        let wanted = asked_start..asked_end.unwrap_or(u64::MAX).min(result.meta.size);
        let from = result.range.start;
        let (meta, attributes) = (result.meta.clone(), result.attributes.clone());
        let chunks = fix::fixed(payload_stream(result), from, wanted.clone());
        Ok(GetResult {
            payload: GetResultPayload::Stream(chunks),
            meta,
            range: wanted,
            attributes,
        })
    }

    /// The number of fields of the first line of a CSV object (cached per object).
    async fn csv_fields(
        &self,
        location: &ObjPath,
        delimiter: u8,
        quote: u8,
    ) -> object_store::Result<usize> {
        let key = (self.root.clone(), location.to_string());
        if let Some(n) = self
            .rules
            .csv_fields
            .lock()
            .ok()
            .and_then(|m| m.get(&key).copied())
        {
            return Ok(n);
        }
        let mut first = Vec::new();
        let mut at = 0;
        loop {
            let bytes = match self.inner.get_range(location, at..at + WINDOW).await {
                Ok(b) => b,
                // Past the end of a short object.
                Err(_) if at > 0 => break,
                Err(e) => return Err(e),
            };
            match memchr::memchr(b'\n', &bytes) {
                Some(i) => {
                    first.extend_from_slice(&bytes[..i]);
                    break;
                }
                None if (bytes.len() as u64) < WINDOW => {
                    first.extend_from_slice(&bytes);
                    break;
                }
                None => first.extend_from_slice(&bytes),
            }
            at += WINDOW;
        }
        let n = clean::csv_field_count(&first, delimiter, quote);
        if let Ok(mut m) = self.rules.csv_fields.lock() {
            m.insert(key, n);
        }
        Ok(n)
    }

    async fn get_cleaned(
        &self,
        location: &ObjPath,
        mut options: GetOptions,
        mode: BadRows,
        format: LineFormat,
    ) -> object_store::Result<GetResult> {
        let (asked_start, asked_end) = match &options.range {
            None => (0, None),
            Some(GetRange::Bounded(r)) => (r.start, Some(r.end)),
            Some(GetRange::Offset(s)) => (*s, None),
            Some(GetRange::Suffix(_)) => return self.inner.get_opts(location, options).await,
        };
        if mode == BadRows::Fail && format == LineFormat::Json {
            return self
                .get_fixed(location, options, asked_start, asked_end)
                .await;
        }
        if let Some(end) = asked_end
            && let Some(l) = self
                .rules
                .long_line(&self.root, location, &(asked_start..end))
        {
            let (lo, hi) = ((asked_start - l.start) as usize, (end - l.start) as usize);
            let bytes = l.bytes.slice(lo..hi);
            return Ok(GetResult {
                payload: GetResultPayload::Stream(
                    futures::stream::once(async { Ok(bytes) }).boxed(),
                ),
                meta: l.meta,
                range: asked_start..end,
                attributes: Default::default(),
            });
        }
        let start = self.line_start(location, asked_start).await?;
        options.range = Some(widened(start, asked_end, WINDOW));
        let first = self.inner.get_opts(location, options).await?;
        let size = first.meta.size;
        let covered = first.range.end;
        let wanted = asked_start..asked_end.unwrap_or(size).min(size);
        let kind = match format {
            LineFormat::Json => Kind::Json,
            LineFormat::Csv { delimiter, quote } => Kind::Csv {
                delimiter,
                quote,
                fields: self.csv_fields(location, delimiter, quote).await?,
            },
        };
        let meta = first.meta.clone();
        let attributes = first.attributes.clone();
        let reader = LineReader {
            store: self.inner.clone(),
            location: location.clone(),
            chunks: payload_stream(first),
            covered,
            size,
            wanted: wanted.clone(),
            cleaner: Cleaner::new(mode, start, kind),
            meta: meta.clone(),
            rules: self.rules.clone(),
            root: self.root.clone(),
            done: false,
        };
        Ok(GetResult {
            payload: GetResultPayload::Stream(reader.into_stream()),
            meta,
            range: wanted,
            attributes,
        })
    }
}

/// The range from `start` to `end` plus `after` (to the end of the object without an `end`).
fn widened(start: u64, end: Option<u64>, after: u64) -> GetRange {
    match end {
        Some(end) => GetRange::Bounded(start..end.saturating_add(after)),
        None => GetRange::Offset(start),
    }
}

/// Reads whole lines from the widened start, cleans them and yields the bytes of `wanted`,
/// reading on past its end until the line it ends in is whole.
struct LineReader {
    store: Arc<dyn ObjectStore>,
    location: ObjPath,
    chunks: BoxStream<'static, object_store::Result<Bytes>>,
    /// End of what has been asked of the store so far.
    covered: u64,
    size: u64,
    wanted: Range<u64>,
    cleaner: Cleaner,
    meta: ObjectMeta,
    rules: Arc<LineRules>,
    root: String,
    done: bool,
}

impl LineReader {
    fn into_stream(self) -> BoxStream<'static, object_store::Result<Bytes>> {
        futures::stream::try_unfold(self, |mut r| async move {
            while !r.done {
                if let Some(bytes) = r.step().await? {
                    return Ok(Some((bytes, r)));
                }
            }
            Ok(None)
        })
        .boxed()
    }

    /// One chunk in; the part of `wanted` it completes, if any.
    async fn step(&mut self) -> object_store::Result<Option<Bytes>> {
        let cleaned = match self.chunks.next().await {
            Some(chunk) => self.cleaner.push(&chunk?),
            // The end of the object: its last line has no newline.
            None if self.covered >= self.size => {
                self.done = true;
                self.cleaner.finish()
            }
            None => {
                let next = self.covered..self.covered.saturating_add(WINDOW).min(self.size);
                let more = self
                    .store
                    .get_opts(
                        &self.location,
                        GetOptions {
                            range: Some(GetRange::Bounded(next.clone())),
                            ..GetOptions::default()
                        },
                    )
                    .await?;
                self.covered = next.end;
                self.chunks = payload_stream(more);
                return Ok(None);
            }
        };
        let bad = std::mem::take(&mut self.cleaner.bad);
        self.rules.record(
            &self.root,
            &self.location,
            &self.store,
            self.cleaner.mode,
            &bad,
        );
        if self.cleaner.at >= self.wanted.end {
            self.done = true;
        }
        let Some((start, bytes)) = cleaned else {
            return Ok(None);
        };
        let bytes = Bytes::from(bytes);
        if self.wanted.end < start + bytes.len() as u64 {
            self.keep_straddling_line(start, &bytes);
        }
        Ok(clip(bytes, start, &self.wanted))
    }

    /// Keeps the line of `lines` (cleaned, from `start`) that the wanted range ends inside,
    /// when it is long, for the reads that continue it.
    fn keep_straddling_line(&self, start: u64, lines: &Bytes) {
        let cut = (self.wanted.end.max(start) - start) as usize;
        let from = memchr::memrchr(b'\n', &lines[..cut]).map_or(0, |i| i + 1);
        let to = memchr::memchr(b'\n', &lines[cut..]).map_or(lines.len(), |i| cut + i + 1);
        if ((to - from) as u64) < WINDOW {
            return;
        }
        self.rules.keep_long_line(
            &self.root,
            &self.location,
            LongLine {
                start: start + from as u64,
                bytes: lines.slice(from..to),
                meta: self.meta.clone(),
            },
        );
    }
}

mod clean;
mod fix;
mod read;
mod store;
mod wire;
pub use clean::BadRows;
use clean::{Cleaner, Kind};
use read::{clip, payload_stream};

#[cfg(test)]
mod tests;
