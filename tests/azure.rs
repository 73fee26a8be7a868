//! `kind = "azure_openai"` against the test server's Azure paths over real HTTP: deployment
//! URLs with `api-version` and the `api-key` header; the flagship writes the rows it writes on
//! `openai`; 429s are absorbed; cached prompt tokens are counted; the batch API under
//! `/openai` gives the live rows; the key shows nowhere; configuration errors are one line.

mod support;

use std::path::Path;

use sluice::Engine;
use sluice::config::Config;
use support::mock_llm::{BatchConfig, PrefixCacheConfig};
use support::providers::{
    flagship_error, flagship_rows, hosted_text, openai_rows, parse_with_key, root,
};
use support::*;

const KEY: &str = "azure-secret-key-0123456789";

/// The flagship's configuration with `[models.default]` of `kind` against `server` (an Azure
/// resource endpoint or an OpenAI base URL), `extra` keys appended, the key in `$AZ_KEY`.
fn config(kind: &str, base_url: &str, extra: &str) -> Config {
    let text = hosted_text(kind, base_url, "gpt-4o-mini", 4, extra);
    parse_with_key(&text, "AZ_KEY", KEY)
}

/// A server of Azure's `2024-10-21` API requiring `key`.
async fn azure_server(key: &str) -> MockServer {
    mock(MockConfig {
        api_key: Some(key.into()),
        azure_api_version: Some("2024-10-21".into()),
        ..MockConfig::default()
    })
    .await
}

/// The flagship's engine on Azure at `server`, the key in `$AZ_KEY`.
fn azure(server: &MockServer) -> Engine {
    let cfg = config("azure_openai", &root(server), "api_key_env = \"AZ_KEY\"\n");
    Engine::new(&cfg).expect("engine starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flagship_on_azure_writes_the_rows_it_writes_on_openai() {
    let expected = openai_rows().await;
    let s = azure_server(KEY).await;
    let engine = azure(&s);
    let rows = flagship_rows(&engine).await;
    assert_eq!(rows, expected);
    assert_eq!(rows.len(), 42);
    let (st, m) = (s.stats(), engine.metrics());
    assert_eq!((st.requests, st.azure_requests), (56, 56), "{st:?}");
    assert_eq!(st.azure_deployments, vec!["gpt-4o-mini".to_string()]);
    assert_eq!((m.requests, m.calls, m.failed), (56, 56, 0));
    assert!(m.tokens_in > 0 && m.tokens_out > 0, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_lose_nothing_and_cached_tokens_are_counted() {
    let s = mock(MockConfig {
        faults: FaultRates {
            rate_limit: 0.05,
            ..FaultRates::default()
        },
        retry_after_ms: 5,
        prefix_cache: Some(PrefixCacheConfig::default()),
        ..MockConfig::default()
    })
    .await;
    let cfg = config(
        "azure_openai",
        &root(&s),
        "input_usd_per_mtok = 2\noutput_usd_per_mtok = 8\ncached_input_usd_per_mtok = 0.5\n",
    );
    let engine = Engine::new(&cfg).unwrap();
    let rows = flagship_rows(&engine).await;
    assert_eq!(rows.len(), 42);
    let (st, m) = (s.stats(), engine.metrics());
    let refused = st.faults.get("rate_limit").copied().unwrap_or(0);
    assert!(refused > 0, "{st:?}");
    assert_eq!(m.failed, 0, "{:?}", m.errors);
    assert_eq!(m.calls, 56);
    assert_eq!(st.requests, 56 + refused, "one more request per 429");
    assert_eq!(m.requests, st.requests);
    // Azure reports cached prompt tokens as OpenAI does.
    assert!(m.tokens_cached > 0);
    assert_eq!(m.tokens_cached, st.prefill_cached);
    assert_eq!(m.tokens_in, st.prefill_cached + st.prefill_computed);
    assert!(m.cost_usd > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_mode_on_azure_writes_the_live_rows() {
    let expected = openai_rows().await;
    let s = mock(MockConfig {
        api_key: Some(KEY.into()),
        batch: BatchConfig::default(),
        ..MockConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(
        "azure_openai",
        &root(&s),
        "api_key_env = \"AZ_KEY\"\nmode = \"batch\"\n[models.default.batch]\npoll_ms = 20\n\
         collect_ms = 150\n",
    );
    cfg.cache.enabled = true;
    cfg.cache.dir = dir.path().join("cache");
    let engine = Engine::new(&cfg).unwrap();
    let rows = flagship_rows(&engine).await;
    assert_eq!(rows, expected);
    let st = s.stats();
    assert_eq!(st.requests, 0, "nothing is sent live");
    assert_eq!((st.batch_lines, st.files_uploaded), (56, 2), "{st:?}");
    assert!(
        st.azure_requests >= 4,
        "every call by the Azure paths: {st:?}"
    );
    let m = engine.metrics();
    assert_eq!((m.calls, m.failed), (56, 0));
    assert!(m.tokens_in > 0);
    drop(engine);
    assert!(
        !any_file_holds(dir.path(), KEY),
        "the key is in no cache entry or batch job"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_or_api_version_fails_the_run_without_showing_the_key() {
    let s = azure_server("the-right-key").await;
    let err = flagship_error(&azure(&s)).await;
    assert!(
        err.contains("authentication failed") && err.contains("$AZ_KEY"),
        "{err}"
    );
    assert!(!err.contains(KEY), "{err}");
    assert!(s.stats().requests == 0, "refused at the Azure front");

    let s = mock(MockConfig {
        azure_api_version: Some("2024-10-21".into()),
        ..MockConfig::default()
    })
    .await;
    let cfg = config(
        "azure_openai",
        &root(&s),
        "api_key_env = \"AZ_KEY\"\napi_version = \"2025-04-01-preview\"\n",
    );
    let err = flagship_error(&Engine::new(&cfg).unwrap()).await;
    assert!(
        err.contains("404") && err.contains("api-version=2025-04-01-preview"),
        "{err}"
    );
    assert!(!err.contains(KEY), "{err}");
}

#[test]
fn configuration_errors_are_one_line() {
    let parse = |extra: &str, base: &str| {
        let text = format!("[models.a]\nkind = \"azure_openai\"\nmodel = \"dep\"\n{base}{extra}");
        Config::parse(&text, Path::new("sluice.toml"), &|_| None)
            .map(|c| c.models["a"].server().unwrap().api_version.clone())
            .map_err(|e| e.to_string())
    };
    let url = "base_url = \"https://res.openai.azure.com\"\n";
    assert_eq!(
        parse("", url).unwrap().as_deref(),
        Some("2024-10-21"),
        "the default"
    );
    assert_eq!(
        parse("api_version = \"2025-04-01-preview\"\n", url)
            .unwrap()
            .as_deref(),
        Some("2025-04-01-preview")
    );
    let errors = [
        (parse("api_version = \"latest\"\n", url), "api_version"),
        (parse("api_version = \"\"\n", url), "api_version"),
        (parse("", ""), "base_url is missing"),
        (
            parse("deployment = \"dep\"\n", url),
            "unknown field `deployment`",
        ),
        (
            parse("prompts_per_request = 4\n", url),
            "one prompt per request",
        ),
        (
            parse("prompt_cache_min_tokens = 4\n", url),
            "belongs to kind = \"anthropic\"",
        ),
    ];
    for (result, says) in errors {
        let e = result.unwrap_err();
        assert!(e.contains(says), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }
    let openai = Config::parse(
        "[models.a]\nkind = \"openai\"\nbase_url = \"http://x/v1\"\nmodel = \"m\"\napi_version = \"2024-10-21\"\n",
        Path::new("sluice.toml"),
        &|_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        openai.contains("belongs to kind = \"azure_openai\""),
        "{openai}"
    );
}
