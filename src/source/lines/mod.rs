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
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path as ObjPath;
use object_store::{
    CopyOptions, GetOptions, GetRange, GetResult, GetResultPayload, ListResult, MultipartUpload,
    ObjectMeta, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload,
    PutResult, RenameOptions,
};

/// What reading does with a malformed line of a JSON-lines table (`OPTIONS ('bad_rows' ...)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadRows {
    /// The statement fails, naming the file and line (the default).
    #[default]
    Fail,
    /// The line is left out and counted.
    Skip,
    /// The line becomes a row of NULLs and is counted.
    Null,
}

impl BadRows {
    /// `fail`, `skip` or `null`.
    pub fn parse(s: &str) -> Option<BadRows> {
        match s.to_ascii_lowercase().as_str() {
            "fail" => Some(BadRows::Fail),
            "skip" => Some(BadRows::Skip),
            "null" => Some(BadRows::Null),
            _ => None,
        }
    }

    /// The option's value as written.
    pub fn as_str(self) -> &'static str {
        match self {
            BadRows::Fail => "fail",
            BadRows::Skip => "skip",
            BadRows::Null => "null",
        }
    }
}

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

#[derive(Debug)]
struct Rule {
    root: String,
    prefix: ObjPath,
    mode: BadRows,
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
}

impl LineRules {
    /// Sets the mode of the objects under `prefix` of the store at `root` (`file://`,
    /// `s3://bucket`), replacing an earlier rule for the same place.
    pub fn set(&self, root: &str, prefix: ObjPath, mode: BadRows) {
        if let Ok(mut rules) = self.rules.write() {
            rules.retain(|r| !(r.root == root && r.prefix == prefix));
            rules.push(Rule {
                root: root.to_string(),
                prefix,
                mode,
            });
        }
    }

    /// The mode of `path`: the rule with the longest matching prefix, else `fail`.
    fn mode_for(&self, root: &str, path: &ObjPath) -> BadRows {
        let Ok(rules) = self.rules.read() else {
            return BadRows::Fail;
        };
        rules
            .iter()
            .filter(|r| r.root == root && path.prefix_matches(&r.prefix))
            .max_by_key(|r| r.prefix.as_ref().len())
            .map_or(BadRows::Fail, |r| r.mode)
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

fn is_json_lines(path: &ObjPath) -> bool {
    matches!(path.extension(), Some("json" | "jsonl" | "ndjson"))
}

/// Bytes asked for per read when widening a range to whole lines.
const WINDOW: u64 = 64 * 1024;

/// Bytes per read of a local file (object_store's own local stream reads 8 KiB at a time).
const FILE_CHUNK: u64 = 1 << 20;

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

    async fn get_cleaned(
        &self,
        location: &ObjPath,
        mut options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let (asked_start, asked_end) = match &options.range {
            None => (0, None),
            Some(GetRange::Bounded(r)) => (r.start, Some(r.end)),
            Some(GetRange::Offset(s)) => (*s, None),
            Some(GetRange::Suffix(_)) => return self.inner.get_opts(location, options).await,
        };
        let start = self.line_start(location, asked_start).await?;
        options.range = Some(match asked_end {
            Some(end) => GetRange::Bounded(start..end.saturating_add(WINDOW)),
            None => GetRange::Offset(start),
        });
        let first = self.inner.get_opts(location, options).await?;
        let size = first.meta.size;
        let covered = first.range.end;
        let wanted = asked_start..asked_end.unwrap_or(size).min(size);
        let mode = self.rules.mode_for(&self.root, location);
        let meta = first.meta.clone();
        let attributes = first.attributes.clone();
        let reader = LineReader {
            store: self.inner.clone(),
            location: location.clone(),
            chunks: payload_stream(first),
            covered,
            size,
            wanted: wanted.clone(),
            cleaner: Cleaner::new(mode, start),
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

/// The chunks of a get, reading a local file 1 MiB at a time on the blocking pool.
fn payload_stream(result: GetResult) -> BoxStream<'static, object_store::Result<Bytes>> {
    let range = result.range.clone();
    match result.payload {
        GetResultPayload::File(file, path) => file_chunks(file, path, range),
        GetResultPayload::Stream(s) => s,
    }
}

fn file_chunks(
    file: std::fs::File,
    path: PathBuf,
    range: Range<u64>,
) -> BoxStream<'static, object_store::Result<Bytes>> {
    let state = (Some(file), range.start);
    futures::stream::try_unfold(state, move |(file, pos)| {
        let path = path.clone();
        let end = range.end;
        async move {
            let Some(mut file) = file.filter(|_| pos < end) else {
                return Ok(None);
            };
            let read = tokio::task::spawn_blocking(move || {
                use std::io::{Read, Seek, SeekFrom};
                file.seek(SeekFrom::Start(pos))?;
                let n = (end - pos).min(FILE_CHUNK) as usize;
                let mut buf = vec![0; n];
                file.read_exact(&mut buf)?;
                Ok::<_, std::io::Error>((file, buf))
            })
            .await
            .map_err(|e| generic(format!("reading {}: {e}", path.display())))?;
            let (file, buf) =
                read.map_err(|e| generic(format!("reading {}: {e}", path.display())))?;
            let next = pos + buf.len() as u64;
            Ok(Some((Bytes::from(buf), (Some(file), next))))
        }
    })
    .boxed()
}

fn generic(message: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "sluice",
        source: message.into(),
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
        let end = start + bytes.len() as u64;
        let lo = self.wanted.start.clamp(start, end) - start;
        let hi = self.wanted.end.clamp(start, end) - start;
        Ok((lo < hi).then(|| Bytes::from(bytes).slice(lo as usize..hi as usize)))
    }
}

/// Whole lines in, the same bytes cleaned out.
struct Cleaner {
    mode: BadRows,
    carry: Vec<u8>,
    /// Offset of `carry[0]` in the object.
    at: u64,
    /// Offsets of the bad lines found since last taken.
    bad: Vec<u64>,
}

impl Cleaner {
    fn new(mode: BadRows, at: u64) -> Cleaner {
        Cleaner {
            mode,
            carry: Vec::new(),
            at,
            bad: Vec::new(),
        }
    }

    /// Adds bytes; returns the lines they complete, cleaned, with their offset.
    fn push(&mut self, chunk: &[u8]) -> Option<(u64, Vec<u8>)> {
        let searched = self.carry.len();
        self.carry.extend_from_slice(chunk);
        let end = searched + memchr::memrchr(b'\n', &self.carry[searched..])? + 1;
        let rest = self.carry.split_off(end);
        let lines = std::mem::replace(&mut self.carry, rest);
        Some(self.clean(lines))
    }

    /// The last line, which has no newline, at the end of the object.
    fn finish(&mut self) -> Option<(u64, Vec<u8>)> {
        if self.carry.is_empty() {
            return None;
        }
        let lines = std::mem::take(&mut self.carry);
        Some(self.clean(lines))
    }

    fn clean(&mut self, mut lines: Vec<u8>) -> (u64, Vec<u8>) {
        let start = self.at;
        let mut pos = start;
        for line in lines.split_mut(|b| *b == b'\n') {
            fix_lone_surrogates(line);
            if self.mode != BadRows::Fail && is_malformed(line) {
                self.bad.push(pos);
                blank(line, self.mode);
            }
            pos += line.len() as u64 + 1;
        }
        self.at += lines.len() as u64;
        (start, lines)
    }
}

/// Not one JSON object (blank lines are not malformed: the reader passes over them).
fn is_malformed(line: &[u8]) -> bool {
    let t = line.trim_ascii();
    if t.is_empty() {
        return false;
    }
    t[0] != b'{' || serde_json::from_slice::<serde::de::IgnoredAny>(t).is_err()
}

/// Blanks (skip) or `{}` then blanks (null), same length.
fn blank(line: &mut [u8], mode: BadRows) {
    line.fill(b' ');
    if mode == BadRows::Null && line.len() >= 2 {
        line[..2].copy_from_slice(b"{}");
    }
}

fn hex4(b: &[u8]) -> Option<u16> {
    let s = std::str::from_utf8(b.get(..4)?).ok()?;
    u16::from_str_radix(s, 16).ok()
}

/// Rewrites each `\uD800`–`\uDFFF` escape that is not part of a pair as `\ufffd`.
fn fix_lone_surrogates(line: &mut [u8]) {
    let mut i = 0;
    while let Some(found) = memchr::memchr(b'\\', &line[i..]) {
        let at = i + found;
        if line.get(at + 1) != Some(&b'u') {
            i = at + 2;
            continue;
        }
        let Some(unit) = hex4(&line[(at + 2).min(line.len())..]) else {
            i = at + 2;
            continue;
        };
        let paired = (0xD800..0xDC00).contains(&unit)
            && line.get(at + 6..at + 8) == Some(b"\\u")
            && hex4(&line[(at + 8).min(line.len())..])
                .is_some_and(|u| (0xDC00..0xE000).contains(&u));
        if paired {
            i = at + 12;
        } else if (0xD800..0xE000).contains(&unit) {
            line[at..at + 6].copy_from_slice(b"\\ufffd");
            i = at + 6;
        } else {
            i = at + 6;
        }
        if i >= line.len() {
            break;
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for CleanLines {
    async fn put_opts(
        &self,
        location: &ObjPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &ObjPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if options.head || !is_json_lines(location) {
            return self.inner.get_opts(location, options).await;
        }
        self.get_cleaned(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &ObjPath,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        if !is_json_lines(location) {
            return self.inner.get_ranges(location, ranges).await;
        }
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            out.push(self.get_range(location, r.clone()).await?);
        }
        Ok(out)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjPath>> {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&ObjPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&ObjPath>,
        offset: &ObjPath,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjPath>,
    ) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &ObjPath,
        to: &ObjPath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &ObjPath,
        to: &ObjPath,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests;
