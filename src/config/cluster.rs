//! `[cluster]`: the sluice workers a coordinator spreads its statements over
//! (`sluice worker --listen ADDR` on each machine).

use std::path::Path;

use url::Url;

use super::raw::RawCluster;
use super::values::Secret;

/// The variable the cluster token is read from when `token_env` is not set.
pub const DEFAULT_TOKEN_ENV: &str = "SLUICE_CLUSTER_TOKEN";

/// The workers of a cluster run (`[cluster] workers = [...]` or `--workers`), and how the
/// coordinator and its workers know each other: a shared token and, optionally, TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Each worker's address (`http://host:port`), in the order tasks are given to them.
    pub workers: Vec<Url>,
    /// The variable the token was read from (`token_env`).
    pub token_env: String,
    /// The cluster token: the coordinator sends it with every request, a worker refuses any
    /// request without it. Read from `token_env` when the configuration is loaded.
    pub token: Option<Secret>,
    /// TLS between the coordinator and its workers (`tls_ca`, `tls_cert`, `tls_key`).
    pub tls: ClusterTls,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            workers: Vec::new(),
            token_env: DEFAULT_TOKEN_ENV.to_string(),
            token: None,
            tls: ClusterTls::default(),
        }
    }
}

/// TLS files of a cluster, read when the configuration is loaded (PEM text).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterTls {
    /// The certificate authority that signed the workers' certificates: with it, the
    /// coordinator (and a worker calling another) connects to workers over TLS only.
    pub ca: Option<String>,
    /// A worker's certificate chain: with it, `sluice worker` serves over TLS only.
    pub cert: Option<String>,
    /// The private key of `cert`.
    pub key: Option<Secret>,
}

impl ClusterTls {
    /// Whether connections to workers use TLS.
    pub fn to_workers(&self) -> bool {
        self.ca.is_some()
    }
}

/// The `[cluster]` table: workers, the token (read from `env`) and the TLS files (relative to
/// `base_dir`).
pub(super) fn cluster(
    raw: &RawCluster,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ClusterConfig, String> {
    let workers =
        ClusterConfig::parse_workers(&raw.workers).map_err(|e| format!("cluster.workers: {e}"))?;
    let token_env = raw
        .token_env
        .clone()
        .unwrap_or_else(|| DEFAULT_TOKEN_ENV.to_string());
    let token = match env(&token_env) {
        Some(t) if t.trim().is_empty() => {
            return Err(format!(
                "cluster: the variable {token_env} is set but empty"
            ));
        }
        Some(t) if t.trim().len() < 16 => {
            return Err(format!(
                "cluster: the token in {token_env} is shorter than 16 characters; use a long \
                 random one (e.g. `openssl rand -hex 32`)"
            ));
        }
        Some(t) => Some(Secret::new(t.trim())),
        None if raw.token_env.is_some() => {
            return Err(format!(
                "cluster.token_env: the variable {token_env} is not set"
            ));
        }
        None => None,
    };
    let read = |key: &str, file: &Option<String>| -> Result<Option<String>, String> {
        let Some(file) = file else { return Ok(None) };
        let path = base_dir.join(file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cluster.{key}: cannot read {}: {e}", path.display()))?;
        if !text.contains("-----BEGIN ") {
            return Err(format!(
                "cluster.{key}: {} is not a PEM file",
                path.display()
            ));
        }
        Ok(Some(text))
    };
    let tls = ClusterTls {
        ca: read("tls_ca", &raw.tls_ca)?,
        cert: read("tls_cert", &raw.tls_cert)?,
        key: read("tls_key", &raw.tls_key)?.map(Secret::new),
    };
    if tls.cert.is_some() != tls.key.is_some() {
        return Err(
            "cluster: tls_cert and tls_key go together (a worker's certificate and \
                    its private key)"
                .to_string(),
        );
    }
    Ok(ClusterConfig {
        workers,
        token_env,
        token,
        tls,
    })
}

impl ClusterConfig {
    /// The cluster of a run without a `sluice.toml`: no workers, the token from
    /// `SLUICE_CLUSTER_TOKEN` when it is set.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<ClusterConfig, String> {
        cluster(&RawCluster::default(), Path::new("."), env)
    }

    /// Whether statements run on workers.
    pub fn distributed(&self) -> bool {
        !self.workers.is_empty()
    }

    /// Parses worker addresses: `http://host:port`, `host:port` (read as `http://host:port`) or
    /// a comma-separated list of them. Duplicates are refused (a worker would get two shares).
    pub fn parse_workers<S: AsRef<str>>(items: &[S]) -> Result<Vec<Url>, String> {
        let mut out: Vec<Url> = Vec::new();
        for item in items {
            for part in item.as_ref().split(',').map(str::trim) {
                if part.is_empty() {
                    continue;
                }
                let url = parse_worker(part)?;
                if out.contains(&url) {
                    return Err(format!("worker {url} is listed twice"));
                }
                out.push(url);
            }
        }
        Ok(out)
    }
}

fn parse_worker(text: &str) -> Result<Url, String> {
    let with_scheme = if text.contains("://") {
        text.to_string()
    } else {
        format!("http://{text}")
    };
    let url = Url::parse(&with_scheme)
        .map_err(|e| format!("worker address {text:?} is not a URL ({e}); write host:port"))?;
    if url.scheme() != "http" {
        return Err(format!(
            "worker address {text:?}: write host:port (TLS is set by [cluster] tls_ca, not by \
             the address)"
        ));
    }
    if url.host_str().is_none() || url.port().is_none() {
        return Err(format!(
            "worker address {text:?} needs a host and a port, e.g. 127.0.0.1:50051"
        ));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        return Err(format!(
            "worker address {text:?}: give only scheme, host and port"
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_read_with_or_without_scheme() {
        let w = ClusterConfig::parse_workers(&["127.0.0.1:5000, http://h:6000", "h2:7"]).unwrap();
        let s: Vec<String> = w.iter().map(|u| u.to_string()).collect();
        assert_eq!(
            s,
            ["http://127.0.0.1:5000/", "http://h:6000/", "http://h2:7/"]
        );
    }

    #[test]
    fn bad_addresses_are_refused_with_the_reason() {
        for (bad, says) in [
            ("127.0.0.1", "needs a host and a port"),
            ("https://h:1", "TLS is set by [cluster] tls_ca"),
            ("h:1,h:1", "listed twice"),
            ("http://h:1/x", "only scheme, host and port"),
            ("h:notaport", "not a URL"),
        ] {
            let e = ClusterConfig::parse_workers(&[bad]).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    fn raw(token_env: Option<&str>, cert: Option<&str>, key: Option<&str>) -> RawCluster {
        RawCluster {
            workers: vec!["127.0.0.1:5000".into()],
            token_env: token_env.map(String::from),
            tls_ca: None,
            tls_cert: cert.map(String::from),
            tls_key: key.map(String::from),
        }
    }

    #[test]
    fn the_token_is_read_from_its_variable_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let long = "a-long-random-cluster-token-0123";
        let env = |k: &str| (k == DEFAULT_TOKEN_ENV).then(|| long.to_string());
        let c = cluster(&raw(None, None, None), dir.path(), &env).unwrap();
        assert_eq!(c.token.as_ref().map(Secret::expose), Some(long));
        assert!(!format!("{c:?}").contains(long), "Debug shows the token");
        // Unset and not named: no token; named and unset: an error.
        let none = |_: &str| None;
        assert!(
            cluster(&raw(None, None, None), dir.path(), &none)
                .unwrap()
                .token
                .is_none()
        );
        let e = cluster(&raw(Some("MY_TOKEN"), None, None), dir.path(), &none).unwrap_err();
        assert!(e.contains("MY_TOKEN is not set"), "{e}");
        let short = |_: &str| Some("abc".to_string());
        let e = cluster(&raw(None, None, None), dir.path(), &short).unwrap_err();
        assert!(e.contains("shorter than 16") && !e.contains("abc"), "{e}");
    }

    #[test]
    fn tls_files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.pem"), "-----BEGIN CERTIFICATE-----\nx\n").unwrap();
        std::fs::write(dir.path().join("k.pem"), "-----BEGIN PRIVATE KEY-----\ny\n").unwrap();
        std::fs::write(dir.path().join("bad.pem"), "not pem").unwrap();
        let none = |_: &str| None;
        let c = cluster(&raw(None, Some("c.pem"), Some("k.pem")), dir.path(), &none).unwrap();
        assert!(c.tls.cert.is_some() && c.tls.key.is_some() && !c.tls.to_workers());
        assert!(
            !format!("{c:?}").contains("PRIVATE KEY"),
            "Debug shows the key"
        );
        for (cert, key, says) in [
            (Some("c.pem"), None, "go together"),
            (Some("bad.pem"), Some("k.pem"), "not a PEM file"),
            (Some("missing.pem"), Some("k.pem"), "cannot read"),
        ] {
            let e = cluster(&raw(None, cert, key), dir.path(), &none).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }
}
