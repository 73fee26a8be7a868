//! What only some provider kinds have: Azure OpenAI's `api_version`, Anthropic's prompt cache
//! threshold and cache prices, Gemini's model ids and cache price, and which keys each kind
//! refuses.

use super::raw::{BaseUrls, RawModel};
use super::values::{ProviderKind, StructuredOutput};

/// The Azure OpenAI API version sent when `api_version` is not given: the latest generally
/// available version of the data-plane inference API with deployment URLs.
pub const DEFAULT_AZURE_API_VERSION: &str = "2024-10-21";

/// Anthropic's `anthropic-version` header.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Whether a kind is a chat protocol: one prompt per request.
pub(super) fn is_chat(kind: ProviderKind) -> bool {
    matches!(
        kind,
        ProviderKind::Openai
            | ProviderKind::AzureOpenai
            | ProviderKind::Anthropic
            | ProviderKind::Gemini
    )
}

/// Whether a kind has a batch API sluice can use (`mode = "batch"`).
pub(super) fn has_batch_api(kind: ProviderKind) -> bool {
    matches!(
        kind,
        ProviderKind::Openai
            | ProviderKind::AzureOpenai
            | ProviderKind::Anthropic
            | ProviderKind::Gemini
    )
}

/// Refuses keys a kind does not take; `Ok` for the rest.
pub(super) fn check_kind_keys(name: &str, m: &RawModel) -> Result<(), String> {
    if m.api_version.is_some() && m.kind != ProviderKind::AzureOpenai {
        return Err(format!(
            "models.{name}.api_version belongs to kind = \"azure_openai\""
        ));
    }
    if m.prompt_cache_min_tokens.is_some() && m.kind != ProviderKind::Anthropic {
        return Err(format!(
            "models.{name}.prompt_cache_min_tokens belongs to kind = \"anthropic\" (other \
             providers cache prompts without being asked)"
        ));
    }
    if m.kind == ProviderKind::Anthropic
        && m.structured_output == Some(StructuredOutput::JsonObject)
    {
        return Err(format!(
            "models.{name}.structured_output: Anthropic has no json_object mode; use \
             \"json_schema\" (a forced tool whose input schema is the function's) or \"none\""
        ));
    }
    if m.kind == ProviderKind::Gemini {
        check_gemini(name, m)?;
    }
    Ok(())
}

/// A Gemini model id goes into the URL's path (`models/{id}:generateContent`): letters,
/// digits, `.`, `_` and `-` (after an optional `models/`); the key never goes into a URL.
fn check_gemini(name: &str, m: &RawModel) -> Result<(), String> {
    let id = m.model.strip_prefix("models/").unwrap_or(&m.model);
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if id.is_empty() || !id.chars().all(plain) {
        return Err(format!(
            "models.{name}.model = {:?} is not a Gemini model id such as \"gemini-2.5-flash\"",
            m.model
        ));
    }
    let urls: Vec<&str> = match &m.base_url {
        Some(BaseUrls::One(u)) => vec![u.as_str()],
        Some(BaseUrls::Many(us)) => us.iter().map(String::as_str).collect(),
        None => vec![],
    };
    if urls.iter().any(|u| u.contains('?')) {
        return Err(format!(
            "models.{name}.base_url must not carry a query (such as ?key=...): give the key's \
             variable in api_key_env; sluice sends it in the x-goog-api-key header"
        ));
    }
    Ok(())
}

/// The API version of an Azure OpenAI model (`None` for other kinds): as given, which must
/// be a date such as `2024-10-21` or `2025-04-01-preview`, else the default.
pub(super) fn api_version(name: &str, m: &RawModel) -> Result<Option<String>, String> {
    if m.kind != ProviderKind::AzureOpenai {
        return Ok(None);
    }
    let Some(v) = &m.api_version else {
        return Ok(Some(DEFAULT_AZURE_API_VERSION.to_string()));
    };
    let date = v.strip_suffix("-preview").unwrap_or(v);
    let parts: Vec<&str> = date.split('-').collect();
    let dated = matches!(parts[..], [y, mo, d] if y.len() == 4 && mo.len() == 2 && d.len() == 2)
        && parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit()));
    if !dated {
        return Err(format!(
            "models.{name}.api_version = {v:?} is not an Azure OpenAI API version such as \
             \"{DEFAULT_AZURE_API_VERSION}\" (the default) or \"2025-04-01-preview\""
        ));
    }
    Ok(Some(v.clone()))
}

/// The shortest prefix an Anthropic model caches, in tokens: Anthropic's published minimum
/// for the model family its id names (4,096 for Opus 4.5+ and Haiku 4.5, 2,048 for Sonnet 4.6
/// and Haiku 3.x, else 1,024); `prompt_cache_min_tokens` when given. 0 for other kinds.
pub(super) fn prompt_cache_min_tokens(m: &RawModel) -> u64 {
    if m.kind != ProviderKind::Anthropic {
        return 0;
    }
    if let Some(n) = m.prompt_cache_min_tokens {
        return n;
    }
    let id = m.model.to_ascii_lowercase();
    let named = |parts: &[&str]| parts.iter().any(|p| id.contains(p));
    if named(&["opus-4-5", "opus-4-6", "opus-4-7", "haiku-4-5"]) {
        4096
    } else if named(&["sonnet-4-6", "haiku-3", "3-haiku", "3-5-haiku"]) {
        2048
    } else {
        1024
    }
}

/// The cached-input and cache-write prices of a kind as multiples of its input price, when
/// not given: Anthropic reads its cache at 0.1 × and writes it (five-minute entries) at
/// 1.25 ×; Gemini bills implicit cache hits of its 2.5 and later models at 0.1 × the input
/// price and has no write charge; other providers do not price their caches apart unless
/// told.
pub(super) fn cache_price_multiples(kind: ProviderKind) -> (f64, f64) {
    match kind {
        ProviderKind::Anthropic => (0.1, 1.25),
        ProviderKind::Gemini => (0.1, 1.0),
        _ => (1.0, 1.0),
    }
}

/// The base URL of a kind that has a public one (Lamini's, Anthropic's, Google's).
pub(super) fn default_base_url(kind: ProviderKind) -> Option<&'static str> {
    match kind {
        ProviderKind::Lamini => Some("https://api.lamini.ai"),
        ProviderKind::Anthropic => Some("https://api.anthropic.com"),
        ProviderKind::Gemini => Some("https://generativelanguage.googleapis.com"),
        _ => None,
    }
}
