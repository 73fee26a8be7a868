//! `sluice-mock-llm`: the project's fault-injecting OpenAI-compatible test server as a process,
//! for the demo script and benchmarks. Prints `listening http://127.0.0.1:PORT/v1`, then serves
//! until SIGINT or SIGTERM.

#[path = "../mock_llm.rs"]
mod mock_llm;

use std::io::Write;
use std::time::Duration;

use mock_llm::{MockConfig, MockServer};

const USAGE: &str = "usage: sluice-mock-llm [--port N] [--latency-ms N] [--jitter-ms N] [--seed N]
  [--rate-limit P] [--server-500 P] [--server-503 P] [--timeout P] [--dropped P]
  [--malformed P] [--truncated P] [--invalid-schema P] [--finish-length P] [--wrong-count P]
  [--retry-after-ms N] [--hang-ms N] [--api-key-env NAME] [--tiktoken-usage]
  [--max-in-flight N] [--rpm N] [--tpm N] [--burst-secs S] [--no-rate-headers]
  [--batch-time-ms N] [--no-batch-api] [--batch-fail-jobs N] [--batch-expire-jobs N]
  [--prefix-cache-blocks N] [--prefill-tokens-per-s N] [--small-model NAME]
P is a probability per request (0..1). --max-in-flight, --rpm and --tpm are limits that answer
429 with Retry-After beyond them (retry-after-ms for the cap); buckets hold --burst-secs of
refill (default 1); x-ratelimit-* headers go on every answer unless --no-rate-headers.
The Files and Batches API (/v1/files, /v1/batches) finishes a job --batch-time-ms after its
creation (default 300); the first --batch-fail-jobs jobs fail, the next --batch-expire-jobs
expire with half their lines done; --no-batch-api answers 404 there.
--prefix-cache-blocks keeps a prefix cache of N blocks of 16 tokens (as vLLM's automatic prefix
caching) and reports usage.prompt_tokens_details.cached_tokens; with --prefill-tokens-per-s the
tokens a request does not find there are computed at that rate, one request at a time in
arrival order, before its --latency-ms.
--small-model NAME answers requests naming that model right on 85% of prompts, and unsure (its
least likely token at p = 0.55 in logprobs) on 90% of its wrong answers and 5% of its right ones,
as the small model of a cascade.";

fn parse_args() -> Result<(MockConfig, u16), String> {
    let mut cfg = MockConfig::default();
    let mut port = 0u16;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--tiktoken-usage" {
            cfg.tiktoken_usage = true;
            continue;
        }
        if flag == "--no-rate-headers" {
            cfg.limits.headers = false;
            continue;
        }
        if flag == "--no-batch-api" {
            cfg.batch.enabled = false;
            continue;
        }
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| -> Result<u64, String> {
            v.parse()
                .map_err(|_| format!("{flag}: {v:?} is not a whole number"))
        };
        let prob = |v: &str| -> Result<f64, String> {
            v.parse::<f64>()
                .ok()
                .filter(|p| (0.0..=1.0).contains(p))
                .ok_or_else(|| format!("{flag}: {v:?} is not a probability"))
        };
        match flag.as_str() {
            "--port" => port = num(&value)? as u16,
            "--latency-ms" => cfg.latency = Duration::from_millis(num(&value)?),
            "--jitter-ms" => cfg.jitter = Duration::from_millis(num(&value)?),
            "--seed" => cfg.seed = num(&value)?,
            "--rate-limit" => cfg.faults.rate_limit = prob(&value)?,
            "--server-500" => cfg.faults.server_500 = prob(&value)?,
            "--server-503" => cfg.faults.server_503 = prob(&value)?,
            "--timeout" => cfg.faults.timeout = prob(&value)?,
            "--dropped" => cfg.faults.dropped_connection = prob(&value)?,
            "--malformed" => cfg.faults.malformed_json = prob(&value)?,
            "--truncated" => cfg.faults.truncated_body = prob(&value)?,
            "--invalid-schema" => cfg.faults.invalid_schema = prob(&value)?,
            "--finish-length" => cfg.faults.finish_length = prob(&value)?,
            "--wrong-count" => cfg.faults.wrong_count = prob(&value)?,
            "--retry-after-ms" => cfg.retry_after_ms = num(&value)?,
            "--hang-ms" => cfg.hang = Duration::from_millis(num(&value)?),
            "--max-in-flight" => cfg.limits.max_in_flight = Some(num(&value)?),
            "--rpm" => cfg.limits.rpm = Some(num(&value)?),
            "--tpm" => cfg.limits.tpm = Some(num(&value)?),
            "--batch-time-ms" => cfg.batch.completion_time = Duration::from_millis(num(&value)?),
            "--batch-fail-jobs" => cfg.batch.fail_jobs = num(&value)?,
            "--batch-expire-jobs" => cfg.batch.expire_jobs = num(&value)?,
            "--prefix-cache-blocks" => {
                cfg.prefix_cache
                    .get_or_insert_with(Default::default)
                    .capacity_blocks = num(&value)? as usize;
            }
            "--prefill-tokens-per-s" => {
                let rate = num(&value)? as f64;
                cfg.prefix_cache
                    .get_or_insert_with(Default::default)
                    .prefill_tokens_per_s = Some(rate);
            }
            "--burst-secs" => {
                cfg.limits.burst_secs = value
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| format!("{flag}: {value:?} is not a positive number"))?
            }
            "--small-model" => cfg.confidence.small_model = Some(value.clone()),
            "--api-key-env" => {
                cfg.api_key =
                    Some(std::env::var(&value).map_err(|_| format!("{value} is not set"))?)
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok((cfg, port))
}

#[tokio::main]
async fn main() {
    let (cfg, port) = match parse_args() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let server = match MockServer::start_on(cfg, port).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    println!("listening {}", server.base_url());
    std::io::stdout().flush().ok();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot watch SIGTERM: {e}");
            std::process::exit(1);
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(server);
}
