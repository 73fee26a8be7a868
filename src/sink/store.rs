//! Object stores for `s3://`, `gs://` and `az://` URLs, created on first use from the standard
//! environment of each cloud (for S3: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_REGION` / `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` for S3-compatible
//! servers such as MinIO; an `http://` endpoint is allowed without further setting).
//!
//! Every location a statement names — a `CREATE EXTERNAL TABLE` location, a `COPY ... TO` target —
//! goes through [`ObjectStores`], so a bucket works wherever a local path does.

use std::sync::Arc;
use std::time::Duration;

use datafusion::common::{DataFusionError, Result};
use datafusion::execution::object_store::{DefaultObjectStoreRegistry, ObjectStoreRegistry};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::{ClientOptions, ObjectStore, RetryConfig};
use url::Url;

/// The object store registry of a sluice session: DataFusion's registry, plus stores built from
/// the environment the first time a bucket is named.
#[derive(Default)]
pub struct ObjectStores {
    inner: DefaultObjectStoreRegistry,
    wrap: Option<Wrap>,
}

/// What a registry does to each store it hands out (the reader of JSON lines wraps them).
pub type Wrap = Arc<dyn Fn(&Url, Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> + Send + Sync>;

impl std::fmt::Debug for ObjectStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStores")
            .field("inner", &self.inner)
            .field("wrapped", &self.wrap.is_some())
            .finish()
    }
}

impl ObjectStores {
    /// A registry whose stores are handed out through `wrap`.
    pub fn wrapped(wrap: Wrap) -> Self {
        ObjectStores {
            inner: DefaultObjectStoreRegistry::default(),
            wrap: Some(wrap),
        }
    }

    fn out(&self, url: &Url, store: Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> {
        match &self.wrap {
            Some(w) => w(url, store),
            None => store,
        }
    }
}

/// Short retries: an unreachable endpoint fails the statement in seconds, not minutes.
fn retry() -> RetryConfig {
    RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(20),
        ..RetryConfig::default()
    }
}

fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(300))
}

/// Builds the store for the bucket (or container) of `url`.
pub fn build_store(url: &Url) -> Result<Arc<dyn ObjectStore>> {
    let bucket = url.host_str().unwrap_or_default();
    let fail = |e: &dyn std::fmt::Display| {
        DataFusionError::Execution(format!(
            "cannot set up the object store for {}://{bucket}: {e}",
            url.scheme()
        ))
    };
    if bucket.is_empty() {
        return Err(fail(&"the URL names no bucket"));
    }
    let store: Arc<dyn ObjectStore> = match url.scheme() {
        "s3" | "s3a" => {
            let endpoint = std::env::var("AWS_ENDPOINT_URL")
                .or_else(|_| std::env::var("AWS_ENDPOINT"))
                .unwrap_or_default();
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry())
                .with_client_options(client_options());
            if endpoint.starts_with("http://") {
                b = b.with_allow_http(true);
            }
            Arc::new(b.build().map_err(|e| fail(&e))?)
        }
        "gs" => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry())
                .with_client_options(client_options())
                .build()
                .map_err(|e| fail(&e))?,
        ),
        "az" | "azure" | "abfs" | "abfss" => Arc::new(
            MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry())
                .with_client_options(client_options())
                .build()
                .map_err(|e| fail(&e))?,
        ),
        other => {
            return Err(DataFusionError::Execution(format!(
                "no object store for {other}:// URLs (sluice reads and writes local paths, \
                 s3://, gs:// and az://)"
            )));
        }
    };
    Ok(store)
}

impl ObjectStoreRegistry for ObjectStores {
    fn register_store(
        &self,
        url: &Url,
        store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        self.inner.register_store(url, store)
    }

    fn deregister_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        self.inner.deregister_store(url)
    }

    fn get_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        if let Ok(store) = self.inner.get_store(url) {
            return Ok(self.out(url, store));
        }
        let store = build_store(url)?;
        self.inner.register_store(url, store.clone());
        Ok(self.out(url, store))
    }
}
