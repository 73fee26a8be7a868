//! The provider batch jobs a run has submitted and not yet collected, stored beside the
//! responses (same database, its own table) and committed before the run waits for them: a run
//! killed while a job is in progress — or a laptop closed overnight — finds the job here and
//! polls it instead of paying for its requests again.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{CacheError, RequestKey, ResponseCache, key_from_hex};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("batch_jobs_v1");

/// One submitted batch job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredJob {
    /// The provider's job id (`batch_...`, `msgbatch_...`).
    pub id: String,
    /// The model's name in `sluice.toml`.
    pub model: String,
    /// The model's endpoint (URL and model id, as in request keys; no secrets).
    pub endpoint: String,
    /// When it was submitted (Unix seconds).
    pub created_at: u64,
    /// The uploaded request file (empty where the requests went inline: Anthropic).
    #[serde(default)]
    pub input_file_id: String,
    /// The request keys it answers (hex), one per line.
    pub keys: Vec<String>,
}

impl StoredJob {
    /// The keys it answers.
    pub(crate) fn request_keys(&self) -> Vec<RequestKey> {
        self.keys.iter().filter_map(|k| key_from_hex(k)).collect()
    }
}

impl ResponseCache {
    fn job_err(&self, e: &dyn std::fmt::Display) -> CacheError {
        CacheError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Stores `job` durably (its own committed transaction, not the writer's next group).
    pub fn put_job(&self, job: &StoredJob) -> Result<(), CacheError> {
        let bytes = serde_json::to_vec(job).map_err(|e| self.job_err(&e))?;
        let w = self.db.begin_write().map_err(|e| self.job_err(&e))?;
        {
            let mut t = w.open_table(JOBS).map_err(|e| self.job_err(&e))?;
            t.insert(job.id.as_str(), bytes.as_slice())
                .map_err(|e| self.job_err(&e))?;
        }
        w.commit().map_err(|e| self.job_err(&e))
    }

    /// Every stored job, oldest first. An unreadable record is skipped.
    pub fn jobs(&self) -> Result<Vec<StoredJob>, CacheError> {
        let r = self.db.begin_read().map_err(|e| self.job_err(&e))?;
        let t = match r.open_table(JOBS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.job_err(&e)),
        };
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.job_err(&e))? {
            let (_, v) = item.map_err(|e| self.job_err(&e))?;
            if let Ok(job) = serde_json::from_slice::<StoredJob>(v.value()) {
                out.push(job);
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    /// Forgets job `id` (collected or cancelled).
    pub fn remove_job(&self, id: &str) -> Result<(), CacheError> {
        let w = self.db.begin_write().map_err(|e| self.job_err(&e))?;
        {
            let mut t = w.open_table(JOBS).map_err(|e| self.job_err(&e))?;
            t.remove(id).map_err(|e| self.job_err(&e))?;
        }
        w.commit().map_err(|e| self.job_err(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key_hex;

    #[test]
    fn jobs_are_stored_listed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ResponseCache::open(dir.path()).unwrap();
        assert!(cache.jobs().unwrap().is_empty());
        let key = [7u8; 32];
        let job = StoredJob {
            id: "batch_1".into(),
            model: "default".into(),
            endpoint: "http://x/v1 m".into(),
            created_at: 5,
            input_file_id: "file-1".into(),
            keys: vec![key_hex(&key)],
        };
        cache.put_job(&job).unwrap();
        drop(cache);
        let cache = ResponseCache::open(dir.path()).unwrap();
        let jobs = cache.jobs().unwrap();
        assert_eq!(jobs, vec![job]);
        assert_eq!(jobs[0].request_keys(), vec![key]);
        cache.remove_job("batch_1").unwrap();
        assert!(cache.jobs().unwrap().is_empty());
        assert_eq!(key_from_hex("zz"), None);
    }
}
