//! `[cluster]`: the sluice workers a coordinator spreads its statements over
//! (`sluice worker --listen ADDR` on each machine).

use url::Url;

/// The workers of a cluster run (`[cluster] workers = [...]` or `--workers`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Each worker's address (`http://host:port`), in the order tasks are given to them.
    pub workers: Vec<Url>,
}

impl ClusterConfig {
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
            "worker address {text:?}: only http:// is served by `sluice worker`"
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
            ("https://h:1", "only http://"),
            ("h:1,h:1", "listed twice"),
            ("http://h:1/x", "only scheme, host and port"),
            ("h:notaport", "not a URL"),
        ] {
            let e = ClusterConfig::parse_workers(&[bad]).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
