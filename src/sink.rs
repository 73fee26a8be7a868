//! Sinks: where `COPY ... TO` writes, and how a write is made all-or-nothing.
//!
//! DataFusion writes straight to the target path, so a failed or killed statement would leave a
//! file that looks complete. sluice stages every local `COPY` into a hidden sibling path
//! (`.name.sluice-tmp-PID-N.ext`) and renames it over the target only when the statement
//! succeeded; on failure the staged output is removed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static STAGE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A COPY target written under a temporary name until [`StagedOutput::commit`].
#[derive(Debug)]
pub struct StagedOutput {
    /// The path the user asked for.
    pub target: PathBuf,
    /// Where the statement actually writes.
    pub staging: PathBuf,
    /// The staging path as the SQL target string (keeps a trailing `/` for directory outputs).
    pub staging_sql: String,
}

/// Whether `target` is a local path (no URL scheme, or `file://`).
pub fn is_local(target: &str) -> bool {
    match target.split_once("://") {
        Some((scheme, _)) => scheme.eq_ignore_ascii_case("file"),
        None => true,
    }
}

impl StagedOutput {
    /// Prepares a staging path beside a local `target`. Returns `None` for object-store URLs,
    /// which are written by their own atomic uploads.
    pub fn for_target(target: &str) -> Option<StagedOutput> {
        if !is_local(target) {
            return None;
        }
        let raw = target.strip_prefix("file://").unwrap_or(target);
        let is_dir = raw.ends_with('/');
        let path = PathBuf::from(raw.trim_end_matches('/'));
        let name = path.file_name()?.to_string_lossy().to_string();
        let parent = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let n = STAGE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("sluice-tmp-{}-{n}", std::process::id());
        let staged_name = match (is_dir, name.rsplit_once('.')) {
            (false, Some((stem, ext))) if !stem.is_empty() => format!(".{stem}.{tag}.{ext}"),
            _ => format!(".{name}.{tag}"),
        };
        let staging = parent.join(&staged_name);
        let mut staging_sql = staging.to_string_lossy().to_string();
        if is_dir {
            staging_sql.push('/');
        }
        Some(StagedOutput {
            target: path,
            staging,
            staging_sql,
        })
    }

    /// Creates the parent directory of the target, so the error for an unwritable location
    /// names the target rather than the staging path.
    pub fn prepare(&self) -> std::io::Result<()> {
        if let Some(parent) = self.target.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)?;
        }
        Ok(())
    }

    /// Moves the staged output over the target (replacing an earlier output).
    pub fn commit(self) -> std::io::Result<()> {
        if !self.staging.exists() {
            // Nothing was written (zero rows to a directory target): an empty directory says so.
            if self.staging_sql.ends_with('/') {
                std::fs::create_dir_all(&self.staging)?;
            } else {
                return Ok(());
            }
        }
        match std::fs::symlink_metadata(&self.target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&self.target)?,
            Ok(_) if self.staging.is_dir() => std::fs::remove_file(&self.target)?,
            _ => {}
        }
        std::fs::rename(&self.staging, &self.target)
    }

    /// Removes whatever the failed statement left in the staging path.
    pub fn abort(self) {
        let _ = if self.staging.is_dir() {
            std::fs::remove_dir_all(&self.staging)
        } else {
            std::fs::remove_file(&self.staging)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_keeps_extension_and_directory_shape() {
        let s = StagedOutput::for_target("out/qa.parquet").unwrap();
        assert!(s.staging_sql.starts_with("out/.qa.sluice-tmp-"));
        assert!(s.staging_sql.ends_with(".parquet"));
        let d = StagedOutput::for_target("out/parts/").unwrap();
        assert!(d.staging_sql.ends_with('/'));
        assert_eq!(d.target, PathBuf::from("out/parts"));
        assert!(StagedOutput::for_target("s3://b/k.parquet").is_none());
    }

    #[test]
    fn commit_replaces_and_abort_removes() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("x.parquet");
        std::fs::write(&target, b"old").unwrap();
        let s = StagedOutput::for_target(target.to_str().unwrap()).unwrap();
        std::fs::write(&s.staging, b"new").unwrap();
        s.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        let s = StagedOutput::for_target(target.to_str().unwrap()).unwrap();
        std::fs::write(&s.staging, b"partial").unwrap();
        let staging = s.staging.clone();
        s.abort();
        assert!(!staging.exists());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
    }
}
