//! Object-store messages for people: an S3 XML error body becomes `Code: Message`, and the
//! staged names this module gives outputs (`.name.sluice-tmp-PID-N.ext`) become the names the
//! user wrote.

/// Shortens object-store errors: an S3 XML error body becomes `Code: Message`, and staged names
/// (`.name.sluice-tmp-PID-N.ext`) become the name the user wrote.
pub(crate) fn tidy_store_message(msg: &str) -> String {
    let mut out = msg.to_string();
    if let Some(start) = out.find("<?xml") {
        let tag = |t: &str| {
            let open = format!("<{t}>");
            let close = format!("</{t}>");
            let a = out[start..].find(&open)? + start + open.len();
            let b = out[a..].find(&close)? + a;
            Some(out[a..b].to_string())
        };
        let summary = match (tag("Code"), tag("Message")) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c,
            _ => String::new(),
        };
        let end = out[start..]
            .find("</Error>")
            .map_or(out.len(), |e| start + e + "</Error>".len());
        out.replace_range(start..end, &summary);
    }
    // `.qa.sluice-tmp-123-0.parquet` -> `qa.parquet`; `.parts.sluice-tmp-123-0` -> `parts`.
    while let Some(i) = out.find(".sluice-tmp-") {
        let begin = out[..i].rfind(['/', ' ', '\'', '"']).map_or(0, |b| b + 1);
        let after = &out[i + ".sluice-tmp-".len()..];
        let digits = after
            .find(|c: char| !(c.is_ascii_digit() || c == '-'))
            .unwrap_or(after.len());
        let end = i + ".sluice-tmp-".len() + digits;
        let stem = out[begin..i].trim_start_matches('.').to_string();
        out.replace_range(begin..end, &stem);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_errors_are_shortened_and_staged_names_hidden() {
        let m = "IO error: Object at location .qa.sluice-tmp-10488-0.parquet not found: Error \
                 performing PUT http://h/no-such-bucket/.qa.sluice-tmp-10488-0.parquet - 404: \
                 <?xml version=\"1.0\"?> <Error><Code>NoSuchBucket</Code><Message>The bucket \
                 does not exist</Message><RequestId>x</RequestId></Error>";
        assert_eq!(
            tidy_store_message(m),
            "IO error: Object at location qa.parquet not found: Error performing PUT \
             http://h/no-such-bucket/qa.parquet - 404: NoSuchBucket: The bucket does not exist"
        );
        assert_eq!(
            tidy_store_message("out/.parts.sluice-tmp-1-2/x"),
            "out/parts/x"
        );
    }
}
