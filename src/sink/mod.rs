//! Sinks: where `COPY ... TO` writes — local paths or object stores ([`store`]) — and how a write
//! is made all-or-nothing.
//!
//! DataFusion writes straight to the target, so a failed or killed statement would leave output
//! that looks complete (a local file, or some of the files of a partitioned write). sluice stages
//! every `COPY` under a hidden sibling name (`.name.sluice-tmp-PID-N.ext`) and moves it over the
//! target only when the statement succeeded; on failure the staged output is removed. On an object
//! store the move is a server-side copy and delete per object; a single file is uploaded with a
//! multipart upload, which S3 never shows until it completes.

pub(crate) mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};

mod message;

pub(crate) use message::tidy_store_message;

static STAGE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Why an output could not be staged or put in place.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SinkError {
    /// The target's store refuses to list its location (missing bucket, bad credentials).
    #[error("cannot write {target}: {message}")]
    Unwritable {
        /// The target as the user wrote it.
        target: String,
        /// The store's answer, tidied.
        message: String,
    },
    /// The directory of a local target cannot be created.
    #[error("cannot create the directory of {target}: {source}")]
    Prepare {
        /// The target as the user wrote it.
        target: String,
        /// Why.
        source: std::io::Error,
    },
    /// The staged output could not be moved over the target.
    #[error("cannot move the output to {target}: {message}")]
    Commit {
        /// The target as the user wrote it.
        target: String,
        /// Why, with staged names shown as the target's.
        message: String,
    },
}

/// Checks that the store holding `url` lets us list the target's parent, before any work.
pub(crate) async fn check_writable(
    store: &dyn ObjectStore,
    url: &url::Url,
    target: &str,
) -> Result<(), SinkError> {
    let parent = ObjPath::from_url_path(url.path()).ok().and_then(|p| {
        let parts: Vec<_> = p.parts().collect();
        let n = parts.len().saturating_sub(1);
        (n > 0).then(|| ObjPath::from_iter(parts[..n].to_vec()))
    });
    store
        .list_with_delimiter(parent.as_ref())
        .await
        .map(|_| ())
        .map_err(|e| SinkError::Unwritable {
            target: target.to_string(),
            message: tidy_store_message(&e.to_string()),
        })
}

/// Whether `target` is a local path (no URL scheme, or `file://`).
pub(crate) fn is_local(target: &str) -> bool {
    match target.split_once("://") {
        Some((scheme, _)) => scheme.eq_ignore_ascii_case("file"),
        None => true,
    }
}

/// Where a staged output lives.
#[derive(Debug)]
enum Place {
    Local {
        target: PathBuf,
        staging: PathBuf,
    },
    Store {
        store: Arc<dyn ObjectStore>,
        target: ObjPath,
        staging: ObjPath,
    },
}

/// A COPY target written under a temporary name until [`StagedOutput::commit`].
#[derive(Debug)]
pub(crate) struct StagedOutput {
    /// The target as the user wrote it.
    pub target: String,
    /// The staging location as the SQL target string (keeps a trailing `/` for directories).
    pub staging_sql: String,
    /// Whether the output is a directory (trailing `/`, or partitioned).
    pub is_dir: bool,
    /// Where it is staged; taken by `commit` or `abort`, and cleaned up on drop otherwise.
    place: Option<Place>,
}

/// Removals of staged outputs in object stores left by statements dropped before they ended
/// (a cancelled run), which [`finish_cleanups`] awaits.
static CLEANUPS: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>> =
    std::sync::Mutex::new(Vec::new());

/// Waits for the staged outputs of dropped statements to be removed from their stores (local
/// ones are removed when dropped).
pub async fn finish_cleanups() {
    let pending = CLEANUPS
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    for task in pending {
        let _ = task.await;
    }
}

impl Drop for StagedOutput {
    /// A statement dropped before commit or abort (Ctrl-C, a cancelled query) leaves nothing.
    fn drop(&mut self) {
        match self.place.take() {
            None => {}
            Some(Place::Local { staging, .. }) => remove_local(&staging),
            Some(place @ Place::Store { .. }) => {
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    let task = handle.spawn(abort_place(place));
                    if let Ok(mut v) = CLEANUPS.lock() {
                        v.push(task);
                    }
                }
            }
        }
    }
}

fn remove_local(staging: &Path) {
    let _ = if staging.is_dir() {
        std::fs::remove_dir_all(staging)
    } else {
        std::fs::remove_file(staging)
    };
}

/// Removes what a staging location holds.
async fn abort_place(place: Place) {
    match place {
        Place::Local { staging, .. } => remove_local(&staging),
        Place::Store { store, staging, .. } => {
            let _ = remove_prefix(store.as_ref(), &staging).await;
            let _ = store.delete(&staging).await;
        }
    }
}

/// `name` with the staging tag: `.stem.sluice-tmp-PID-N.ext`, or `.name.sluice-tmp-PID-N`.
fn staged_name(name: &str, is_dir: bool) -> String {
    let n = STAGE_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tag = format!("sluice-tmp-{}-{n}", std::process::id());
    match (is_dir, name.rsplit_once('.')) {
        (false, Some((stem, ext))) if !stem.is_empty() => format!(".{stem}.{tag}.{ext}"),
        _ => format!(".{name}.{tag}"),
    }
}

impl StagedOutput {
    /// Prepares a staging location beside a local `target`.
    pub fn local(target: &str, is_dir: bool) -> Option<StagedOutput> {
        let raw = target.strip_prefix("file://").unwrap_or(target);
        let is_dir = is_dir || raw.ends_with('/');
        let path = PathBuf::from(raw.trim_end_matches('/'));
        let name = path.file_name()?.to_string_lossy().to_string();
        let parent = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let staging = parent.join(staged_name(&name, is_dir));
        let sql = staging.to_string_lossy().to_string();
        Some(Self::staged(
            target,
            sql,
            is_dir,
            Place::Local {
                target: path,
                staging,
            },
        ))
    }

    fn staged(target: &str, mut staging_sql: String, is_dir: bool, place: Place) -> StagedOutput {
        if is_dir {
            staging_sql.push('/');
        }
        StagedOutput {
            target: target.to_string(),
            staging_sql,
            is_dir,
            place: Some(place),
        }
    }

    /// Prepares a staging location beside `target` (a URL) in `store`.
    pub fn in_store(
        target: &str,
        url: &url::Url,
        store: Arc<dyn ObjectStore>,
        is_dir: bool,
    ) -> Option<StagedOutput> {
        let is_dir = is_dir || target.ends_with('/');
        let full = ObjPath::from_url_path(url.path()).ok()?;
        let parts: Vec<_> = full.parts().collect();
        let (name, parent) = parts.split_last()?;
        let staged = staged_name(name.as_ref(), is_dir);
        let staging = ObjPath::from_iter(
            parent
                .iter()
                .map(|p| p.as_ref().to_string())
                .chain(std::iter::once(staged)),
        );
        let root = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
        let sql = format!("{root}/{staging}");
        Some(Self::staged(
            target,
            sql,
            is_dir,
            Place::Store {
                store,
                target: full,
                staging,
            },
        ))
    }

    /// Creates the parent directory of a local target, so the error for an unwritable location
    /// names the target rather than the staging path.
    pub fn prepare(&self) -> Result<(), SinkError> {
        if let Some(Place::Local { target, .. }) = &self.place
            && let Some(parent) = target.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|source| SinkError::Prepare {
                target: self.target.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Moves the staged output over the target (replacing an earlier output).
    pub async fn commit(mut self) -> Result<(), SinkError> {
        let result = match self.place.take() {
            None => Ok(()),
            Some(Place::Local { target, staging }) => {
                commit_local(&target, &staging, self.is_dir).map_err(|e| e.to_string())
            }
            Some(Place::Store {
                store,
                target,
                staging,
            }) => commit_store(store.as_ref(), &target, &staging, self.is_dir)
                .await
                .map_err(|e| e.to_string()),
        };
        result.map_err(|message| SinkError::Commit {
            target: self.target.clone(),
            message: tidy_store_message(&message),
        })
    }

    /// Removes whatever the failed statement left in the staging location.
    pub async fn abort(mut self) {
        if let Some(place) = self.place.take() {
            abort_place(place).await;
        }
    }
}

fn commit_local(target: &Path, staging: &Path, is_dir: bool) -> std::io::Result<()> {
    if !staging.exists() {
        // Nothing was written (zero rows to a directory target): an empty directory says so.
        if is_dir {
            std::fs::create_dir_all(staging)?;
        } else {
            return Ok(());
        }
    }
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(target)?,
        Ok(_) if staging.is_dir() => std::fs::remove_file(target)?,
        _ => {}
    }
    std::fs::rename(staging, target)
}

/// Deletes every object under `prefix/`.
async fn remove_prefix(store: &dyn ObjectStore, prefix: &ObjPath) -> object_store::Result<()> {
    let objects: Vec<_> = store.list(Some(prefix)).try_collect().await?;
    for o in objects {
        store.delete(&o.location).await?;
    }
    Ok(())
}

async fn commit_store(
    store: &dyn ObjectStore,
    target: &ObjPath,
    staging: &ObjPath,
    is_dir: bool,
) -> object_store::Result<()> {
    if !is_dir {
        return match store.head(staging).await {
            Ok(_) => store.rename(staging, target).await,
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        };
    }
    // Replace an earlier output: remove what is under the target prefix, then move each staged
    // object to the same relative place under the target.
    remove_prefix(store, target).await?;
    let staged: Vec<_> = store.list(Some(staging)).try_collect().await?;
    for o in staged {
        let Some(rel) = o.location.prefix_match(staging) else {
            continue;
        };
        let dest = ObjPath::from_iter(target.parts().chain(rel).map(|p| p.as_ref().to_string()));
        store.rename(&o.location, &dest).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_keeps_extension_and_directory_shape() {
        let s = StagedOutput::local("out/qa.parquet", false).unwrap();
        assert!(s.staging_sql.starts_with("out/.qa.sluice-tmp-"));
        assert!(s.staging_sql.ends_with(".parquet"));
        let d = StagedOutput::local("out/parts/", false).unwrap();
        assert!(d.staging_sql.ends_with('/') && d.is_dir);
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let url = url::Url::parse("s3://b/out/qa.parquet").unwrap();
        let s = StagedOutput::in_store("s3://b/out/qa.parquet", &url, store, false).unwrap();
        assert!(
            s.staging_sql.starts_with("s3://b/out/.qa.sluice-tmp-"),
            "{}",
            s.staging_sql
        );
        assert!(s.staging_sql.ends_with(".parquet"));
    }

    #[tokio::test]
    async fn commit_replaces_and_abort_removes() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("x.parquet");
        std::fs::write(&target, b"old").unwrap();
        let staging_of = |s: &StagedOutput| PathBuf::from(&s.staging_sql);
        let s = StagedOutput::local(target.to_str().unwrap(), false).unwrap();
        std::fs::write(staging_of(&s), b"new").unwrap();
        s.commit().await.unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        let s = StagedOutput::local(target.to_str().unwrap(), false).unwrap();
        let staging = staging_of(&s);
        std::fs::write(&staging, b"partial").unwrap();
        s.abort().await;
        assert!(!staging.exists());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
    }

    #[tokio::test]
    async fn store_directories_move_object_by_object() {
        let mem = Arc::new(object_store::memory::InMemory::new());
        let store: Arc<dyn ObjectStore> = mem.clone();
        store
            .put(&ObjPath::from("out/old.parquet"), b"old".to_vec().into())
            .await
            .unwrap();
        let url = url::Url::parse("s3://b/out/").unwrap();
        let s = StagedOutput::in_store("s3://b/out/", &url, store.clone(), true).unwrap();
        let staging = s.staging_sql.trim_start_matches("s3://b/").to_string();
        for part in ["company=A/p0.parquet", "company=B/p0.parquet"] {
            let p = ObjPath::from(format!("{staging}{part}"));
            store.put(&p, b"x".to_vec().into()).await.unwrap();
        }
        s.commit().await.unwrap();
        let mut names: Vec<String> = store
            .list(None)
            .map_ok(|o| o.location.to_string())
            .try_collect()
            .await
            .unwrap();
        names.sort();
        assert_eq!(
            names,
            ["out/company=A/p0.parquet", "out/company=B/p0.parquet"]
        );
    }
}
