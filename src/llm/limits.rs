//! Reading what a server says about waiting: `Retry-After` (seconds, milliseconds or an HTTP
//! date), and the rate-limit headers of OpenAI (`x-ratelimit-*`, resets like `6m0s`, `1.5s`,
//! `20ms`) and Anthropic (`anthropic-ratelimit-*`, resets as RFC 3339 times).
//!
//! Every value comes from a server and is parsed without panicking: negative, NaN, malformed
//! or absurd values are ignored (`None`), huge ones saturate (the dispatcher clamps every wait
//! to `backoff_max_ms`), dates in the past mean no wait.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::HeaderMap;

use crate::types::{RateLimits, RateWindow};

/// Seconds as a duration: `None` unless finite and not negative; saturating when huge.
pub(crate) fn seconds(secs: f64) -> Option<Duration> {
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// A duration as servers write one: bare seconds (`12`, `0.5`) or Go-style units (`6m0s`,
/// `1.5s`, `20ms`, `1h2m3s`, `250us`, `10ns`).
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Ok(v) = s.parse::<f64>() {
        return seconds(v);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    seconds(total)
}

/// How long `Retry-After` (or `retry-after-ms`) asks to wait.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return seconds(ms / 1000.0);
    }
    let v = get("retry-after")?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return seconds(secs);
    }
    // An HTTP date: wait until then.
    Some(until(httpdate_to_unix(v)?))
}

/// How long the `google.rpc.RetryInfo` detail of a Google error body asks to wait
/// (`{"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
/// "retryDelay": "17s"}]}}`; a protobuf duration: seconds with a fraction, then `s`).
pub(crate) fn retry_info(body: &[u8]) -> Option<Duration> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.pointer("/error/details")?
        .as_array()?
        .iter()
        .filter(|d| {
            d.get("@type")
                .and_then(serde_json::Value::as_str)
                .is_some_and(|t| t.ends_with("google.rpc.RetryInfo"))
        })
        .find_map(|d| d.get("retryDelay")?.as_str().and_then(parse_duration))
}

/// The time from now until `unix` seconds (zero if past).
fn until(unix: u64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Duration::from_secs(unix.saturating_sub(now))
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm); `None` before 1970.
fn days_from_civil(year: u64, month: u64, day: u64) -> Option<u64> {
    if year < 1970 || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).checked_sub(719_468)
}

/// Unix seconds of a date and `HH:MM:SS` time.
fn unix_seconds(year: u64, month: u64, day: u64, hms: &str) -> Option<u64> {
    let parts: Vec<u64> = hms
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, s] = parts[..] else {
        return None;
    };
    if h > 23 || m > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day)? * 86_400 + h * 3600 + m * 60 + s)
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) to Unix seconds.
fn httpdate_to_unix(s: &str) -> Option<u64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = months.iter().position(|m| *m == parts[2])? as u64 + 1;
    unix_seconds(
        parts[3].parse().ok()?,
        month,
        parts[1].parse().ok()?,
        parts[4],
    )
}

/// Parses an RFC 3339 UTC time (`2024-06-01T12:00:30Z`, fractions ignored) to Unix seconds.
fn rfc3339_to_unix(s: &str) -> Option<u64> {
    let (date, time) = s.trim().split_once(['T', 't', ' '])?;
    let d: Vec<u64> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [year, month, day] = d[..] else {
        return None;
    };
    let time = time.strip_suffix(['Z', 'z'])?;
    let hms = time.split('.').next()?;
    unix_seconds(year, month, day, hms)
}

/// A count as servers write it; fractions are cut, anything else is ignored.
fn count(s: &str) -> Option<u64> {
    let v: f64 = s.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| v.min(u64::MAX as f64) as u64)
}

/// The rate limits an answer's headers advertise (OpenAI's or Anthropic's names).
pub(crate) fn rate_limits(headers: &HeaderMap) -> RateLimits {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let openai = |what: &str| RateWindow {
        limit: get(&format!("x-ratelimit-limit-{what}")).and_then(count),
        remaining: get(&format!("x-ratelimit-remaining-{what}")).and_then(count),
        reset: get(&format!("x-ratelimit-reset-{what}")).and_then(parse_duration),
    };
    let anthropic = |what: &str| RateWindow {
        limit: get(&format!("anthropic-ratelimit-{what}-limit")).and_then(count),
        remaining: get(&format!("anthropic-ratelimit-{what}-remaining")).and_then(count),
        reset: get(&format!("anthropic-ratelimit-{what}-reset"))
            .and_then(rfc3339_to_unix)
            .map(until),
    };
    let pick = |a: RateWindow, b: RateWindow| if a.is_empty() { b } else { a };
    RateLimits {
        requests: pick(openai("requests"), anthropic("requests")),
        tokens: pick(openai("tokens"), anthropic("tokens")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn google_retry_info_gives_the_wait() {
        let body = |delay: &str| {
            format!(
                r#"{{"error": {{"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
                {{"@type": "type.googleapis.com/google.rpc.QuotaFailure"}},
                {{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "{delay}"}}]}}}}"#
            )
        };
        assert_eq!(
            retry_info(body("17s").as_bytes()),
            Some(Duration::from_secs(17))
        );
        assert_eq!(
            retry_info(body("0.250s").as_bytes()),
            Some(Duration::from_millis(250))
        );
        assert_eq!(retry_info(body("-3s").as_bytes()), None);
        assert_eq!(retry_info(body("soon").as_bytes()), None);
        assert_eq!(retry_info(br#"{"error": {"details": []}}"#), None);
        assert_eq!(retry_info(b"not json"), None);
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn durations_in_the_forms_servers_send() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_duration("1.5s"), Some(ms(1500)));
        assert_eq!(parse_duration("20ms"), Some(ms(20)));
        assert_eq!(parse_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(parse_duration(" 12 "), Some(Duration::from_secs(12)));
        assert_eq!(parse_duration("0.5"), Some(ms(500)));
        for bad in [
            "", "-1s", "-3", "NaN", "nan", "inf", "1x", "s", "1.2.3s", "ms20", "1e400",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        assert_eq!(
            parse_duration("1e20"),
            Some(Duration::MAX),
            "huge saturates"
        );
        assert_eq!(parse_duration("99999999999999999999h"), Some(Duration::MAX));
    }

    #[test]
    fn retry_after_in_every_form_without_panicking() {
        let ra = |pairs: &[(&'static str, &str)]| retry_after(&headers(pairs));
        assert_eq!(ra(&[("retry-after", "2")]), Some(Duration::from_secs(2)));
        assert_eq!(
            ra(&[("retry-after", "0.25")]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            ra(&[("retry-after", "2"), ("retry-after-ms", "150")]),
            Some(Duration::from_millis(150))
        );
        // Used to panic in Duration::from_secs_f64.
        assert_eq!(ra(&[("retry-after", "1e20")]), Some(Duration::MAX));
        assert_eq!(ra(&[("retry-after-ms", "1e300")]), Some(Duration::MAX));
        for bad in ["-5", "NaN", "soon", "", "Sun, 06 Nov 1994 08:49:37 PST"] {
            assert_eq!(ra(&[("retry-after", bad)]), None, "{bad:?}");
        }
        assert_eq!(ra(&[("retry-after-ms", "-1")]), None);
        // A date in the past: no wait; one in the future: the time until it.
        assert_eq!(
            ra(&[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")]),
            Some(Duration::ZERO)
        );
        let later = ra(&[("retry-after", "Fri, 01 Jan 2100 00:00:00 GMT")]).unwrap();
        assert!(later > Duration::from_secs(365 * 86_400));
        assert_eq!(
            httpdate_to_unix("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(httpdate_to_unix("Sun, 06 Nov 1994 25:49:37 GMT"), None);
        assert_eq!(httpdate_to_unix("Sun, 06 Foo 1994 08:49:37 GMT"), None);
    }

    #[test]
    fn rate_limit_headers_of_openai_and_anthropic() {
        let r = rate_limits(&headers(&[
            ("x-ratelimit-limit-requests", "12000"),
            ("x-ratelimit-remaining-requests", "11999"),
            ("x-ratelimit-reset-requests", "5ms"),
            ("x-ratelimit-limit-tokens", "2000000"),
            ("x-ratelimit-remaining-tokens", "1999000.5"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]));
        assert_eq!(
            r.requests,
            RateWindow {
                limit: Some(12_000),
                remaining: Some(11_999),
                reset: Some(Duration::from_millis(5)),
            }
        );
        assert_eq!(r.tokens.remaining, Some(1_999_000));
        assert_eq!(r.tokens.reset, Some(Duration::from_secs(360)));
        let a = rate_limits(&headers(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2100-01-01T00:00:00Z"),
        ]));
        assert_eq!(a.requests.limit, Some(50));
        assert_eq!(a.requests.remaining, Some(0));
        assert!(a.requests.reset.unwrap() > Duration::from_secs(86_400));
        assert_eq!(rfc3339_to_unix("1970-01-02T00:00:01.5Z"), Some(86_401));
        // Garbage is ignored, not an error.
        let g = rate_limits(&headers(&[
            ("x-ratelimit-limit-requests", "-3"),
            ("x-ratelimit-remaining-requests", "lots"),
            ("x-ratelimit-reset-requests", "soon"),
            ("anthropic-ratelimit-tokens-reset", "yesterday"),
        ]));
        assert!(g.is_empty(), "{g:?}");
        assert!(rate_limits(&HeaderMap::new()).is_empty());
    }
}
