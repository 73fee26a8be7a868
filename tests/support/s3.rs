//! A real S3-compatible server for tests: moto's server on a free port of 127.0.0.1, started from
//! the virtual environment `scripts/test.sh` creates (`.venv-moto/`, or `$SLUICE_MOTO_SERVER`),
//! and ended by PID when dropped.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Fake credentials: moto accepts any; tests check they never leak.
pub const ACCESS_KEY: &str = "AKIASLUICETEST000001";
/// The secret key used against moto.
pub const SECRET_KEY: &str = "sluice-s3-secret-7f3a9c1e5b";

/// A running moto server.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

fn moto_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_MOTO_SERVER") {
        return PathBuf::from(p);
    }
    let p = super::repo().join(".venv-moto/bin/moto_server");
    assert!(
        p.exists(),
        "moto_server not found at {}: run scripts/test.sh (it creates .venv-moto with \
         moto[server]) or set SLUICE_MOTO_SERVER",
        p.display()
    );
    p
}

impl Moto {
    /// Starts moto and waits until it accepts connections (at most 30 s).
    pub fn start() -> Moto {
        Self::start_env(&[])
    }

    /// [`Moto::start`] with extra environment variables for the server.
    pub fn start_env(env: &[(&str, &str)]) -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(moto_binary())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start in 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        moto
    }

    /// The environment a sluice process needs to use this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
        ]
    }

    /// Creates a bucket.
    pub async fn create_bucket(&self, name: &str) {
        let r = reqwest::Client::new()
            .put(format!("{}/{name}", self.endpoint))
            .send()
            .await
            .expect("moto answers");
        assert!(
            r.status().is_success(),
            "create bucket {name}: {}",
            r.status()
        );
    }

    /// An object store client for `bucket`.
    pub fn store(&self, bucket: &str) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_bucket_name(bucket)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_region("us-east-1")
            .build()
            .expect("S3 client")
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Starts a moto that authenticates every request, so unknown keys are refused.
    pub fn start_with_auth() -> Moto {
        Self::start_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")])
    }
}
