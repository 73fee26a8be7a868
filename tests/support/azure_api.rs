//! Azure OpenAI's URLs for the test server: `/openai/deployments/{deployment}/chat/completions`
//! and the Files and Batches API under `/openai/files` and `/openai/batches`, each with an
//! `api-version` query parameter (400 without one, or with another than the server's
//! `azure_api_version` when set) and the key in the `api-key` header (401 without it when the
//! server has a key; `Authorization: Bearer` does not count). A request that passes is served
//! as the OpenAI path it stands for.

use super::{MockConfig, Request, response};

fn refusal(status: u16, code: &str, message: &str) -> Vec<u8> {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    response(status, &[], body.to_string().as_bytes())
}

/// `req` with an Azure path rewritten to the OpenAI path it stands for (other paths as they
/// are), or the refusal to send; the deployment it named, if any.
pub(super) fn front(
    cfg: &MockConfig,
    mut req: Request,
) -> Result<(Request, Option<String>), Vec<u8>> {
    let (path, query) = req.path.split_once('?').unwrap_or((req.path.as_str(), ""));
    let Some(rest) = path.strip_prefix("/openai/") else {
        return Ok((req, None));
    };
    let version = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("api-version="))
        .filter(|v| !v.is_empty());
    let Some(version) = version else {
        return Err(refusal(400, "BadRequest", "Missing API version parameter."));
    };
    if cfg
        .azure_api_version
        .as_ref()
        .is_some_and(|want| want != version)
    {
        return Err(refusal(404, "404", "Resource not found"));
    }
    if let Some(key) = &cfg.api_key
        && req.header("api-key") != Some(key.as_str())
    {
        return Err(refusal(
            401,
            "401",
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to \
             provide a valid key for an active subscription and use a correct regional API \
             endpoint for your resource.",
        ));
    }
    let parts: Vec<&str> = rest.split('/').collect();
    let (path, deployment) = match parts.as_slice() {
        ["deployments", d, "chat", "completions"] => {
            ("/v1/chat/completions".to_string(), Some(d.to_string()))
        }
        ["deployments", ..] => return Err(refusal(404, "404", "Resource not found")),
        _ => (format!("/v1/{rest}"), None),
    };
    req.path = path;
    req.headers
        .retain(|(k, _)| !k.eq_ignore_ascii_case("authorization"));
    if let Some(key) = &cfg.api_key {
        req.headers
            .push(("authorization".into(), format!("Bearer {key}")));
    }
    Ok((req, deployment))
}
