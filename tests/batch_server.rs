//! The test server's OpenAI Files and Batches API, driven over real HTTP: uploads, jobs and
//! their timing, output and error files matching the live endpoint, per-line and whole-job
//! faults, cancellation, limits, and the server without the API.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::mock_llm::BatchConfig;
use support::*;

const BOUNDARY: &str = "sluice-test-boundary-7d1f";

/// A chat request body for `user`, with a structured-output schema if `schema`.
fn chat_body(user: &str, schema: bool) -> Value {
    let mut body = json!({
        "model": "gpt-test",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}],
    });
    if schema {
        body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "r",
            "strict": true, "schema": {"type": "object", "properties": {
                "answer": {"type": "string"}, "n": {"type": "integer"}},
                "required": ["answer", "n"], "additionalProperties": false}}});
    }
    body
}

/// A JSONL batch file: one line per `(custom_id, body)`.
fn jsonl(lines: &[(String, Value)]) -> String {
    lines
        .iter()
        .map(|(id, body)| {
            let line = json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
                              "body": body});
            format!("{line}\n")
        })
        .collect()
}

/// Lines `row-0..n` asking about `topic i`.
fn lines(n: usize, topic: &str) -> Vec<(String, Value)> {
    (0..n)
        .map(|i| {
            (
                format!("row-{i}"),
                chat_body(&format!("{topic} {i}"), i % 2 == 0),
            )
        })
        .collect()
}

/// A multipart/form-data body with `purpose` and `file` fields.
fn multipart(purpose: &str, filename: &str, content: &[u8]) -> Vec<u8> {
    let mut body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
         Content-Type: application/jsonl\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    body
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(server: &MockServer) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: server.base_url(),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body read");
        (status, serde_json::from_str(&text).expect("JSON answer"))
    }

    async fn upload_raw(&self, purpose: &str, content: &[u8]) -> (u16, Value) {
        let req = self
            .http
            .post(format!("{}/files", self.base))
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(multipart(purpose, "input.jsonl", content));
        self.send(req).await
    }

    async fn upload(&self, content: &str) -> String {
        let (status, v) = self.upload_raw("batch", content.as_bytes()).await;
        assert_eq!(status, 200, "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        self.send(req).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn create(&self, file_id: &str) -> Value {
        let body = json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                          "completion_window": "24h", "metadata": {"run": "test"}});
        let (status, v) = self.post("/batches", &body).await;
        assert_eq!(status, 200, "{v}");
        v
    }

    /// Polls until the batch is final; returns it and the statuses seen.
    async fn wait(&self, id: &str) -> (Value, Vec<String>) {
        let deadline = Instant::now() + WAIT_DEADLINE;
        let mut seen: Vec<String> = vec![];
        loop {
            let (status, v) = self.get(&format!("/batches/{id}")).await;
            assert_eq!(status, 200, "{v}");
            let s = v["status"].as_str().unwrap().to_string();
            if seen.last() != Some(&s) {
                seen.push(s.clone());
            }
            if ["completed", "failed", "expired", "cancelled"].contains(&s.as_str()) {
                return (v, seen);
            }
            assert!(
                Instant::now() < deadline,
                "batch {id} never ended: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The lines of a file, by custom_id.
    async fn file(&self, id: &Value) -> HashMap<String, Value> {
        let id = id.as_str().expect("a file id");
        let resp = (self.http.get(format!("{}/files/{id}/content", self.base)))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let text = resp.text().await.unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
            .map(|v| (v["custom_id"].as_str().unwrap().to_string(), v))
            .collect()
    }
}

async fn start(cfg: MockConfig) -> (MockServer, Api) {
    let server = MockServer::start(cfg).await.expect("server starts");
    let api = Api::new(&server);
    (server, api)
}

fn content(body: &Value) -> &str {
    body["choices"][0]["message"]["content"].as_str().unwrap()
}

fn hash_of(body: &Value) -> String {
    let m = &body["messages"];
    prompt_hash(m[0]["content"].as_str(), m[1]["content"].as_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_answers_match_the_live_endpoint() {
    // In progress for 1.8 s: the polls see it, however late a loaded machine runs them.
    let cfg = MockConfig {
        batch: BatchConfig {
            completion_time: Duration::from_secs(2),
            ..BatchConfig::default()
        },
        ..MockConfig::default()
    };
    let (server, api) = start(cfg).await;
    let input = lines(6, "What was revenue in quarter");
    let file = api.upload(&jsonl(&input)).await;
    let created = api.create(&file).await;
    assert_eq!(created["status"], "validating");
    assert_eq!(created["object"], "batch");
    assert_eq!(created["metadata"], json!({"run": "test"}));
    assert_eq!(created["request_counts"]["total"], 6);
    let id = created["id"].as_str().unwrap();
    let (done, seen) = api.wait(id).await;
    assert_eq!(seen.last().unwrap(), "completed", "{seen:?}");
    assert!(seen.contains(&"in_progress".to_string()), "{seen:?}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 6, "completed": 6, "failed": 0})
    );
    assert_eq!(done["error_file_id"], Value::Null);
    assert!(done["completed_at"].is_u64() && done["in_progress_at"].is_u64());
    let out = api.file(&done["output_file_id"]).await;
    assert_eq!(out.len(), 6);
    for (custom_id, body) in &input {
        let line = &out[custom_id];
        assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
        assert_eq!(line["error"], Value::Null);
        let resp = &line["response"];
        assert_eq!(resp["status_code"], 200);
        assert!(resp["request_id"].as_str().unwrap().starts_with("req_"));
        let batched = &resp["body"];
        assert_eq!(batched["object"], "chat.completion");
        assert!(content(batched).contains(&format!("[{}]", hash_of(body))));
        let (status, live) = api.post("/chat/completions", body).await;
        assert_eq!(status, 200);
        assert_eq!(content(batched), content(&live), "{custom_id}");
        assert_eq!(batched["usage"], live["usage"]);
        assert_eq!(batched["model"], live["model"]);
    }
    let s = server.stats();
    assert_eq!(
        (s.files_uploaded, s.batch_lines, s.batches_created),
        (1, 6, 1)
    );
    assert!(s.batch_polls >= 2 && s.batch_cancels == 0);
    // Live counters count the live requests only; attempts count both.
    assert_eq!((s.requests, s.prompts, s.ok), (6, 6, 6));
    assert_eq!(s.by_prompt.len(), 6);
    assert!(s.by_prompt.values().all(|n| *n == 2), "{:?}", s.by_prompt);
    assert_eq!(server.batches(), vec![(id.to_string(), 6)]);
    assert_eq!(s.to_json()["batch_lines"], 6);
    server.reset_stats();
    assert_eq!(server.stats().batches_created, 0);
    // The input file is served back as uploaded.
    let (status, meta) = api.get(&format!("/files/{file}")).await;
    assert_eq!((status, meta["purpose"].as_str()), (200, Some("batch")));
    assert_eq!(meta["bytes"], jsonl(&input).len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_line_faults_reach_the_error_file() {
    let cfg = MockConfig {
        permanent: vec![
            ("FAIL500".into(), Fault::Server500),
            ("DROPME".into(), Fault::DroppedConnection),
            ("SLOWDOWN".into(), Fault::RateLimit),
            ("BADSCHEMA".into(), Fault::InvalidSchema),
            ("CUTSHORT".into(), Fault::FinishLength),
        ],
        ..MockConfig::default()
    };
    let (server, api) = start(cfg).await;
    let mut input = lines(3, "Fine question");
    for marker in ["FAIL500", "DROPME", "SLOWDOWN", "BADSCHEMA", "CUTSHORT"] {
        input.push((marker.to_string(), chat_body(&format!("{marker} q"), true)));
    }
    input.push(("no-user".into(), json!({"model": "m", "messages": []})));
    let file = api.upload(&jsonl(&input)).await;
    let id = api.create(&file).await["id"].as_str().unwrap().to_string();
    let (done, _) = api.wait(&id).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(
        done["request_counts"],
        json!({"total": 9, "completed": 5, "failed": 4})
    );
    let (out, err) = (
        api.file(&done["output_file_id"]).await,
        api.file(&done["error_file_id"]).await,
    );
    assert_eq!(out.len(), 5);
    assert_eq!(err.len(), 4);
    for (custom_id, status, kind) in [
        ("FAIL500", 500, "server_error"),
        ("DROPME", 500, "server_error"),
        ("SLOWDOWN", 429, "rate_limit_error"),
        ("no-user", 400, "invalid_request_error"),
    ] {
        let r = &err[custom_id]["response"];
        assert_eq!(r["status_code"], status, "{custom_id}");
        assert_eq!(r["body"]["error"]["type"], kind, "{custom_id}");
        assert_eq!(err[custom_id]["error"], Value::Null);
    }
    let bad = &out["BADSCHEMA"]["response"]["body"];
    assert_eq!(content(bad), "[\"wrong\"]");
    let cut = &out["CUTSHORT"]["response"]["body"];
    assert_eq!(cut["choices"][0]["finish_reason"], "length");
    let s = server.stats();
    assert_eq!(s.faults.get("server_500"), Some(&1));
    assert_eq!(s.faults.get("rate_limit"), Some(&1));
    assert_eq!(s.requests, 0);
}

/// A prompt's attempts are counted across live and batched requests: a twin server answering
/// live only draws the same fault at each attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_are_shared_between_live_and_batch() {
    let cfg = MockConfig {
        faults: FaultRates {
            server_500: 0.5,
            ..FaultRates::default()
        },
        ..MockConfig::default()
    };
    let (server, api) = start(cfg.clone()).await;
    let (_twin, twin) = start(cfg).await;
    let input = lines(24, "Attempt");
    let file = api.upload(&jsonl(&input)).await;
    let id = api.create(&file).await["id"].as_str().unwrap().to_string();
    let (done, _) = api.wait(&id).await;
    let failed = done["request_counts"]["failed"].as_u64().unwrap();
    assert!(failed > 0 && failed < 24, "{failed}");
    let err = match done["error_file_id"].as_str() {
        Some(_) => api.file(&done["error_file_id"]).await,
        None => HashMap::new(),
    };
    for (custom_id, body) in &input {
        let (first, _) = twin.post("/chat/completions", body).await;
        assert_eq!(err.contains_key(custom_id), first == 500, "{custom_id}");
        let (second_live, _) = api.post("/chat/completions", body).await;
        let (second_twin, _) = twin.post("/chat/completions", body).await;
        assert_eq!(second_live, second_twin, "{custom_id}: attempt 1");
    }
    assert!(server.stats().by_prompt.values().all(|n| *n == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_expired_jobs() {
    let cfg = MockConfig {
        batch: BatchConfig {
            fail_jobs: 1,
            expire_jobs: 1,
            ..BatchConfig::default()
        },
        ..MockConfig::default()
    };
    let (server, api) = start(cfg).await;
    let input = lines(6, "Job");
    let file = api.upload(&jsonl(&input)).await;
    let mut ids = vec![];
    for _ in 0..3 {
        ids.push(api.create(&file).await["id"].as_str().unwrap().to_string());
    }
    let (failed, _) = api.wait(&ids[0]).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["errors"]["object"], "list");
    assert_eq!(failed["errors"]["data"][0]["code"], "invalid_request");
    assert!(failed["failed_at"].is_u64());
    assert_eq!(failed["output_file_id"], Value::Null);
    let (expired, _) = api.wait(&ids[1]).await;
    assert_eq!(expired["status"], "expired");
    assert!(expired["expired_at"].is_u64());
    assert_eq!(
        expired["request_counts"],
        json!({"total": 6, "completed": 3, "failed": 3})
    );
    let out = api.file(&expired["output_file_id"]).await;
    let err = api.file(&expired["error_file_id"]).await;
    let mut done: Vec<&String> = out.keys().collect();
    done.sort();
    assert_eq!(done, ["row-0", "row-1", "row-2"]);
    for i in 3..6 {
        let line = &err[&format!("row-{i}")];
        assert_eq!(line["response"], Value::Null);
        assert_eq!(line["error"]["code"], "batch_expired");
        let message = "This request could not be executed before the completion window expired.";
        assert_eq!(line["error"]["message"], message);
    }
    let (third, _) = api.wait(&ids[2]).await;
    assert_eq!(third["status"], "completed");
    // Lines never run are no attempts.
    assert_eq!(server.stats().by_prompt.values().sum::<u64>(), 3 + 6);
    let listed: Vec<(String, u64)> = ids.iter().map(|i| (i.clone(), 6)).collect();
    assert_eq!(server.batches(), listed);
}

/// The completion time of the job [`cancel_keeps_the_lines_done`] cancels: its first line is
/// done 0.58 s after it is created, its last at its end.
const COMPLETION: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_keeps_the_lines_done() {
    let cfg = MockConfig {
        batch: BatchConfig {
            completion_time: COMPLETION,
            ..BatchConfig::default()
        },
        ..MockConfig::default()
    };
    let (server, api) = start(cfg).await;
    let input = lines(20, "Cancel");
    let file = api.upload(&jsonl(&input)).await;
    let id = api.create(&file).await["id"].as_str().unwrap().to_string();
    let ends = Instant::now() + COMPLETION;
    // Cancelled once some lines are done, seconds before the last.
    wait_until("a line done", || {
        server.batch_state(&id).is_some_and(|(_, done)| done > 0)
    })
    .await;
    let (status, v) = api.post(&format!("/batches/{id}/cancel"), &json!({})).await;
    assert_eq!((status, v["status"].as_str()), (200, Some("cancelling")));
    assert!(v["cancelling_at"].is_u64());
    let (done, seen) = api.wait(&id).await;
    assert_eq!(seen, ["cancelled"]);
    let n = done["request_counts"]["completed"].as_u64().unwrap();
    assert!(n > 0 && n < 20, "{n}");
    assert_eq!(done["error_file_id"], Value::Null);
    let out = api.file(&done["output_file_id"]).await;
    assert_eq!(out.len() as u64, n);
    assert!((0..n).all(|i| out.contains_key(&format!("row-{i}"))));
    // Still cancelled after the completion time.
    tokio::time::sleep_until(ends.into()).await;
    let (_, later) = api.get(&format!("/batches/{id}")).await;
    assert_eq!(later["status"], "cancelled");
    assert_eq!(later["request_counts"]["completed"], n);

    // A finished batch stays as it is; a server-side cancel acts at once.
    let second = api.create(&file).await["id"].as_str().unwrap().to_string();
    assert!(server.cancel_batch(&second));
    assert!(!server.cancel_batch("batch_nope"));
    let (gone, _) = api.wait(&second).await;
    assert_eq!(gone["status"], "cancelled");
    assert_eq!(gone["request_counts"]["completed"], 0);
    let (status, again) = api
        .post(&format!("/batches/{second}/cancel"), &json!({}))
        .await;
    assert_eq!((status, again["status"].as_str()), (200, Some("cancelled")));
    assert_eq!(server.stats().batch_cancels, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_batches_stay_completed_when_cancelled() {
    let cfg = MockConfig {
        batch: BatchConfig {
            completion_time: Duration::ZERO,
            ..BatchConfig::default()
        },
        ..MockConfig::default()
    };
    let (_server, api) = start(cfg).await;
    let file = api.upload(&jsonl(&lines(2, "Quick"))).await;
    let id = api.create(&file).await["id"].as_str().unwrap().to_string();
    let (status, v) = api.post(&format!("/batches/{id}/cancel"), &json!({})).await;
    assert_eq!((status, v["status"].as_str()), (200, Some("completed")));
    let (_, list) = api.get("/batches").await;
    assert_eq!(list["data"][0]["id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_and_jobs_are_validated() {
    let cfg = MockConfig {
        batch: BatchConfig {
            max_file_bytes: 2000,
            max_file_lines: 3,
            ..BatchConfig::default()
        },
        api_key: Some("sk-test".into()),
        ..MockConfig::default()
    };
    let (server, mut api) = start(cfg).await;
    let (status, _) = api.get("/batches/batch_1").await;
    assert_eq!(status, 401);
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", "Bearer sk-test".parse().unwrap());
    api.http = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    let upload_error = |(status, v): (u16, Value)| {
        assert_eq!(status, 400, "{v}");
        v["error"]["message"].as_str().unwrap().to_string()
    };
    let big: Vec<(String, Value)> = vec![("a".into(), chat_body(&"x".repeat(2100), false))];
    let e = upload_error(api.upload_raw("batch", jsonl(&big).as_bytes()).await);
    assert!(e.contains("2000 bytes"), "{e}");
    let four: Vec<(String, Value)> = (0..4)
        .map(|i| (format!("r{i}"), chat_body("q", false)))
        .collect();
    let e = upload_error(api.upload_raw("batch", jsonl(&four).as_bytes()).await);
    assert!(e.contains("maximum is 3 lines"), "{e}");
    let e = upload_error(
        api.upload_raw("fine-tune", jsonl(&lines(1, "L")).as_bytes())
            .await,
    );
    assert!(e.contains("purpose"), "{e}");
    let dup = jsonl(&[lines(1, "A"), lines(1, "B")].concat());
    let e = upload_error(api.upload_raw("batch", dup.as_bytes()).await);
    assert!(e.contains("duplicate custom_id"), "{e}");
    let wrong_url = jsonl(&lines(1, "U")).replace("/v1/chat/completions", "/v1/embeddings");
    let e = upload_error(api.upload_raw("batch", wrong_url.as_bytes()).await);
    assert!(e.contains("Line 1") && e.contains("url"), "{e}");
    upload_error(api.upload_raw("batch", b"not json\n").await);
    upload_error(api.upload_raw("batch", b"").await);

    let file = api.upload(&jsonl(&lines(3, "Ok"))).await;
    let job = |file: &str, endpoint: &str| json!({"input_file_id": file, "endpoint": endpoint, "completion_window": "24h"});
    let (status, _) = api
        .post("/batches", &job("file-404", "/v1/chat/completions"))
        .await;
    assert_eq!(status, 404);
    let (status, _) = api.post("/batches", &job(&file, "/v1/embeddings")).await;
    assert_eq!(status, 400);
    let (status, v) = api.get("/batches/batch_404").await;
    assert_eq!(status, 404, "{v}");
    let (status, _) = api.get("/files/file-404/content").await;
    assert_eq!(status, 404);
    let s = server.stats();
    assert_eq!(
        (s.files_uploaded, s.batch_lines, s.batches_created),
        (1, 3, 0)
    );
    assert_eq!(s.batch_polls, 1, "the refused poll is not counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_api_every_path_is_404() {
    let cfg = MockConfig {
        batch: BatchConfig {
            enabled: false,
            ..BatchConfig::default()
        },
        ..MockConfig::default()
    };
    let (server, api) = start(cfg).await;
    let (status, v) = api
        .upload_raw("batch", jsonl(&lines(1, "N")).as_bytes())
        .await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["message"], "Invalid URL (POST /v1/files)");
    let body = json!({"input_file_id": "file-0", "endpoint": "/v1/chat/completions",
                      "completion_window": "24h"});
    assert_eq!(api.post("/batches", &body).await.0, 404);
    assert_eq!(api.get("/batches/batch_0").await.0, 404);
    assert_eq!(api.get("/files/file-0/content").await.0, 404);
    assert_eq!(api.post("/batches/batch_0/cancel", &json!({})).await.0, 404);
    // The live endpoint still answers.
    let (status, _) = api
        .post("/chat/completions", &chat_body("live", false))
        .await;
    assert_eq!(status, 200);
    let s = server.stats();
    assert_eq!((s.files_uploaded, s.batch_polls, s.requests), (0, 0, 1));
}

/// Uploads past the 64 MiB a chat request may carry are read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_uploads_are_accepted() {
    let (server, api) = start(MockConfig::default()).await;
    let passage = "The quarter's revenue rose. ".repeat(520_000);
    let input: Vec<(String, Value)> = (0..5)
        .map(|i| {
            (
                format!("big-{i}"),
                chat_body(&format!("{i}: {passage}"), false),
            )
        })
        .collect();
    let text = jsonl(&input);
    assert!(text.len() > 64 << 20, "{}", text.len());
    let file = api.upload(&text).await;
    let id = api.create(&file).await["id"].as_str().unwrap().to_string();
    let (done, _) = api.wait(&id).await;
    assert_eq!(done["request_counts"]["completed"], 5);
    let out = api.file(&done["output_file_id"]).await;
    let body = &out["big-3"]["response"]["body"];
    assert!(content(body).contains(&format!("[{}]", hash_of(&input[3].1))));
    assert_eq!(server.stats().batch_lines, 5);
}
