//! The persistent response cache, and the key under which a call's result is shared and stored.
//!
//! Two calls with the same key are the same call: same endpoint and model, same generation
//! parameters, same output schema, same rendered messages. The dispatcher uses the key to send
//! identical prompts once per run, and [`ResponseCache`] stores every validated response under it
//! in an embedded database (redb), durably as it arrives, so a re-run or a resumed crash pays only
//! for what was never answered.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde_json::Value;

use crate::types::Usage;

mod claims;
mod jobs;
mod key;
mod pacing;
mod remote;
mod shared;
mod tls;
mod wire;
mod work;

pub use claims::held_by_dead;
pub use jobs::StoredJob;
#[cfg(test)]
use key::request_key;
pub(crate) use key::{KeyPrefix, RequestKey, key_from_hex, key_hex};
pub use pacing::{ADMIT_PATIENCE, Allowance, Grants, Pacing};
pub(crate) use remote::Lookup;
pub use remote::SharedCache;
pub use shared::{CacheServer, Counters};
pub use work::{Next, WorkQueues};

/// How a run uses the persistent response cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum CacheMode {
    /// Answer from the cache when possible; store every new validated response.
    #[default]
    ReadWrite,
    /// Ignore stored responses but store new ones (`--refresh`).
    Refresh,
    /// Neither read nor write (`--no-cache`).
    Off,
    /// Answer from the cache when possible; store nothing (`sluice explain`).
    ReadOnly,
}

impl CacheMode {
    /// Whether stored responses answer calls.
    pub fn reads(self) -> bool {
        matches!(self, CacheMode::ReadWrite | CacheMode::ReadOnly)
    }

    /// Whether new responses are stored.
    pub fn writes(self) -> bool {
        matches!(self, CacheMode::ReadWrite | CacheMode::Refresh)
    }
}

/// Memory redb may use for its page cache. The B-tree's branch pages fit; a leaf of a large cache
/// is read from the OS page cache instead. Measured on a 285 MB cache file (1 GB corpus): 16 MiB
/// answers as fast as 64 MiB, and 256 MiB saves about 10% of the run for 280 MB more memory.
const CACHE_MEMORY_BYTES: usize = 16 << 20;

/// Errors of the persistent cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Another process holds the cache.
    #[error(
        "the response cache {0} is in use by another sluice process; wait for it to finish, \
         or run with --no-cache or --cache-dir DIR"
    )]
    Busy(PathBuf),
    /// The store could not be opened, read or written.
    #[error("response cache {path}: {message}")]
    Store {
        /// The cache file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

/// A validated response as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CachedResponse {
    /// The value the function returned (already validated against its schema).
    pub value: Value,
    /// Token usage of the original request, if reported.
    pub usage: Option<Usage>,
    /// `finish_reason` of the original response.
    pub finish_reason: Option<String>,
}

impl CachedResponse {
    fn encode(&self) -> Vec<u8> {
        // [prompt, completion], and the cached prompt tokens third when there are any (an
        // entry written before they were counted has two numbers, and reads as none cached).
        let usage = self.usage.map(|u| match u.cached_prompt_tokens {
            0 => serde_json::json!([u.prompt_tokens, u.completion_tokens]),
            c => serde_json::json!([u.prompt_tokens, u.completion_tokens, c]),
        });
        serde_json::to_vec(&serde_json::json!({
            "v": self.value, "u": usage, "f": self.finish_reason,
        }))
        .unwrap_or_default()
    }

    fn decode(bytes: &[u8]) -> Option<CachedResponse> {
        let mut doc: serde_json::Map<String, Value> = serde_json::from_slice(bytes).ok()?;
        let value = doc.remove("v")?;
        let usage = match doc.remove("u") {
            Some(Value::Array(a)) if a.len() == 2 || a.len() == 3 => Some(Usage::new(
                a[0].as_u64()?,
                a[1].as_u64()?,
                a.get(2).and_then(Value::as_u64).unwrap_or(0),
            )),
            _ => None,
        };
        let finish_reason = match doc.remove("f") {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        Some(CachedResponse {
            value,
            usage,
            finish_reason,
        })
    }
}

/// Size and contents of a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Stored responses.
    pub entries: u64,
    /// Bytes of the cache file on disk.
    pub file_bytes: u64,
    /// Bytes of stored keys and values (without the store's own overhead).
    pub payload_bytes: u64,
}

const RESPONSES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("responses_v1");

/// Largest group of responses committed in one durable transaction.
const MAX_GROUP: usize = 4096;

enum WriterMsg {
    Put(RequestKey, Vec<u8>),
    Flush(tokio::sync::oneshot::Sender<Result<(), String>>),
}

/// The persistent response store: a redb database file under the cache directory.
///
/// Reads go straight to the store. Writes go to one writer thread that commits whatever has
/// arrived as one durable transaction (group commit), so every response is on disk within one
/// commit's time of arriving without making callers wait for an fsync. redb locks the file, so
/// a second process opening the same cache gets [`CacheError::Busy`] instead of corrupting it.
pub struct ResponseCache {
    db: Arc<Database>,
    path: PathBuf,
    tx: Mutex<Option<std::sync::mpsc::Sender<WriterMsg>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    written: Arc<AtomicU64>,
    write_errors: Arc<AtomicU64>,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("path", &self.path)
            .finish()
    }
}

impl ResponseCache {
    /// The cache file inside a cache directory.
    pub fn file_in(dir: &Path) -> PathBuf {
        dir.join("responses.redb")
    }

    /// Opens (creating if needed) the cache in `dir`.
    pub fn open(dir: &Path) -> Result<ResponseCache, CacheError> {
        let path = Self::file_in(dir);
        let store_err = |message: String| CacheError::Store {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| store_err(format!("cannot create {}: {e}", dir.display())))?;
        // redb's page cache defaults to 1 GiB, which a large cache file would fill over a run:
        // keep it small so memory stays flat in the size of the cache (lookups beyond it are
        // served by the OS page cache).
        let db = match Database::builder()
            .set_cache_size(CACHE_MEMORY_BYTES)
            .create(&path)
        {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(CacheError::Busy(dir.to_path_buf()));
            }
            Err(e) => return Err(store_err(e.to_string())),
        };
        // Create the table up front so that readers never see it missing.
        let w = db.begin_write().map_err(|e| store_err(e.to_string()))?;
        w.open_table(RESPONSES)
            .map_err(|e| store_err(e.to_string()))?;
        w.commit().map_err(|e| store_err(e.to_string()))?;
        let db = Arc::new(db);
        let (tx, rx) = std::sync::mpsc::channel();
        let written = Arc::new(AtomicU64::new(0));
        let write_errors = Arc::new(AtomicU64::new(0));
        let writer = {
            let (db, written, errors, path) = (
                db.clone(),
                written.clone(),
                write_errors.clone(),
                path.clone(),
            );
            std::thread::Builder::new()
                .name("sluice-cache-writer".into())
                .spawn(move || writer_loop(&db, &rx, &written, &errors, &path))
                .map_err(|e| store_err(format!("cannot start the writer thread: {e}")))?
        };
        Ok(ResponseCache {
            db,
            path,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            written,
            write_errors,
        })
    }

    /// The cache file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored response for `key`, if any. A damaged entry reads as absent.
    #[cfg(test)]
    pub(crate) fn get(&self, key: &RequestKey) -> Result<Option<CachedResponse>, CacheError> {
        Ok(self.get_many(std::slice::from_ref(key))?.pop().flatten())
    }

    /// The stored responses for `keys`, in their order, read in one transaction (and in key
    /// order, which keeps the B-tree's pages warm). A damaged entry reads as absent.
    pub(crate) fn get_many(
        &self,
        keys: &[RequestKey],
    ) -> Result<Vec<Option<CachedResponse>>, CacheError> {
        let err = |e: &dyn std::fmt::Display| CacheError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        };
        let r = self.db.begin_read().map_err(|e| err(&e))?;
        let t = r.open_table(RESPONSES).map_err(|e| err(&e))?;
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_unstable_by_key(|&i| &keys[i]);
        let mut out = vec![None; keys.len()];
        for i in order {
            let got = t.get(&keys[i]).map_err(|e| err(&e))?;
            out[i] = got.and_then(|g| CachedResponse::decode(g.value()));
        }
        Ok(out)
    }

    /// Queues `resp` to be stored under `key`; it is durable after the writer's next commit.
    pub(crate) fn put(&self, key: RequestKey, resp: &CachedResponse) {
        let bytes = resp.encode();
        if let Ok(tx) = self.tx.lock()
            && let Some(tx) = tx.as_ref()
        {
            let _ = tx.send(WriterMsg::Put(key, bytes));
        }
    }

    /// Waits until everything queued so far is durable.
    pub async fn flush(&self) -> Result<(), CacheError> {
        let (done, wait) = tokio::sync::oneshot::channel();
        let sent = match self.tx.lock() {
            Ok(tx) => tx
                .as_ref()
                .is_some_and(|tx| tx.send(WriterMsg::Flush(done)).is_ok()),
            Err(_) => false,
        };
        if !sent {
            return Ok(());
        }
        match wait.await {
            Ok(Ok(())) | Err(_) => Ok(()),
            Ok(Err(message)) => Err(CacheError::Store {
                path: self.path.clone(),
                message,
            }),
        }
    }

    /// Responses committed by this process so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Responses this process failed to store.
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }

    /// Counts entries and sizes.
    pub fn stats(&self) -> Result<CacheStats, CacheError> {
        let err = |e: &dyn std::fmt::Display| CacheError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        };
        let r = self.db.begin_read().map_err(|e| err(&e))?;
        let t = r.open_table(RESPONSES).map_err(|e| err(&e))?;
        let mut entries = 0;
        let mut payload_bytes = 0;
        for item in t.iter().map_err(|e| err(&e))? {
            let (_, v) = item.map_err(|e| err(&e))?;
            entries += 1;
            payload_bytes += 32 + v.value().len() as u64;
        }
        let file_bytes = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        Ok(CacheStats {
            entries,
            file_bytes,
            payload_bytes,
        })
    }

    /// Removes every stored response.
    pub fn clear(&self) -> Result<u64, CacheError> {
        let err = |e: &dyn std::fmt::Display| CacheError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        };
        let w = self.db.begin_write().map_err(|e| err(&e))?;
        let n = {
            let t = w.open_table(RESPONSES).map_err(|e| err(&e))?;
            t.len().map_err(|e| err(&e))?
        };
        w.delete_table(RESPONSES).map_err(|e| err(&e))?;
        w.open_table(RESPONSES).map_err(|e| err(&e))?;
        w.commit().map_err(|e| err(&e))?;
        Ok(n)
    }

    /// Stops the writer after it has stored everything queued.
    pub fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(mut w) = self.writer.lock()
            && let Some(handle) = w.take()
        {
            let _ = handle.join();
        }
    }
}

impl Drop for ResponseCache {
    fn drop(&mut self) {
        self.close();
    }
}

fn writer_loop(
    db: &Database,
    rx: &std::sync::mpsc::Receiver<WriterMsg>,
    written: &AtomicU64,
    errors: &AtomicU64,
    path: &Path,
) {
    let mut warned = false;
    while let Ok(first) = rx.recv() {
        let mut puts = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                WriterMsg::Put(k, v) => puts.push((k, v)),
                WriterMsg::Flush(done) => flushes.push(done),
            }
            if puts.len() < MAX_GROUP {
                next = rx.try_recv().ok();
            }
        }
        let result = if puts.is_empty() {
            Ok(())
        } else {
            commit_group(db, &puts)
        };
        match &result {
            Ok(()) => {
                written.fetch_add(puts.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                errors.fetch_add(puts.len() as u64, Ordering::Relaxed);
                if !warned {
                    tracing::warn!("cannot store responses in {}: {e}", path.display());
                    warned = true;
                }
            }
        }
        for done in flushes {
            let _ = done.send(result.clone());
        }
    }
}

fn commit_group(db: &Database, puts: &[(RequestKey, Vec<u8>)]) -> Result<(), String> {
    let w = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut t = w.open_table(RESPONSES).map_err(|e| e.to_string())?;
        for (k, v) in puts {
            t.insert(k, v.as_slice()).map_err(|e| e.to_string())?;
        }
    }
    w.commit().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::key::tests::req;
    use super::*;

    fn resp(v: Value) -> CachedResponse {
        CachedResponse {
            value: v,
            usage: Some(Usage::new(12, 3, 0)),
            finish_reason: Some("stop".into()),
        }
    }

    #[tokio::test]
    async fn stores_durably_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = request_key("e", &req("one", None));
        let k2 = request_key("e", &req("two", None));
        {
            let c = ResponseCache::open(dir.path()).unwrap();
            assert_eq!(c.get(&k1).unwrap(), None);
            c.put(k1, &resp(serde_json::json!({"a": [1, 2]})));
            c.put(k2, &resp(serde_json::json!("text")));
            c.flush().await.unwrap();
            assert_eq!(c.written(), 2);
            assert_eq!(
                c.get(&k1).unwrap().unwrap(),
                resp(serde_json::json!({"a": [1, 2]}))
            );
        }
        let c = ResponseCache::open(dir.path()).unwrap();
        assert_eq!(
            c.get(&k2).unwrap().unwrap().value,
            serde_json::json!("text")
        );
        let st = c.stats().unwrap();
        assert_eq!(st.entries, 2);
        assert!(st.file_bytes > 0 && st.payload_bytes > 64);
        assert_eq!(c.clear().unwrap(), 2);
        assert_eq!(c.get(&k2).unwrap(), None);
        assert_eq!(c.stats().unwrap().entries, 0);
    }

    #[test]
    fn a_second_opener_gets_a_clear_busy_error() {
        let dir = tempfile::tempdir().unwrap();
        let _first = ResponseCache::open(dir.path()).unwrap();
        let e = ResponseCache::open(dir.path()).unwrap_err();
        assert!(matches!(e, CacheError::Busy(_)), "{e}");
        assert!(e.to_string().contains("in use by another sluice process"));
    }

    #[test]
    fn entries_without_cached_tokens_still_read() {
        // An entry written before cached prompt tokens were counted: two usage numbers.
        let old = br#"{"v": {"a": 1}, "u": [12, 3], "f": "stop"}"#;
        let r = CachedResponse::decode(old).expect("an old entry reads");
        assert_eq!(r.usage, Some(Usage::new(12, 3, 0)));
        assert_eq!(r.value, serde_json::json!({"a": 1}));
        // Without cached tokens an entry is written as before; with them they come back.
        assert_eq!(
            resp(serde_json::json!(1)).encode(),
            br#"{"v":1,"u":[12,3],"f":"stop"}"#
        );
        let mut r = resp(serde_json::json!(1));
        r.usage = Some(Usage::new(12, 3, 8));
        assert_eq!(CachedResponse::decode(&r.encode()), Some(r));
    }

    #[test]
    fn damaged_entries_read_as_absent() {
        assert_eq!(CachedResponse::decode(b"not json"), None);
        assert_eq!(CachedResponse::decode(b"{\"u\": null}"), None);
        let r = resp(serde_json::json!(null));
        assert_eq!(CachedResponse::decode(&r.encode()), Some(r));
    }
}
