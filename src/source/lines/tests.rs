use super::clean::*;
use super::*;

use object_store::PutPayload;
use object_store::memory::InMemory;

fn clean_all(mode: BadRows, text: &str) -> (String, Vec<u64>) {
    let mut c = Cleaner::new(mode, 0, Kind::Json);
    let mut out = Vec::new();
    // Fed in small pieces, so that lines and escapes cross chunk boundaries.
    for piece in text.as_bytes().chunks(3) {
        if let Some((_, b)) = c.push(piece) {
            out.extend(b);
        }
    }
    if let Some((_, b)) = c.finish() {
        out.extend(b);
    }
    (String::from_utf8(out).unwrap(), c.bad)
}

#[test]
fn lone_surrogates_become_the_replacement_character_in_every_mode() {
    let text = "{\"a\":\"x\\ud800\"}\n{\"a\":\"\\ud83d\\ude00 ok\"}\n{\"a\":\"\\udc00\\\\ud800\"}\n{\"a\":\"\\ud800\\u0041\"}";
    let (out, bad) = clean_all(BadRows::Fail, text);
    assert_eq!(
        out,
        "{\"a\":\"x\\ufffd\"}\n{\"a\":\"\\ud83d\\ude00 ok\"}\n{\"a\":\"\\ufffd\\\\ud800\"}\n{\"a\":\"\\ufffd\\u0041\"}"
    );
    assert!(bad.is_empty());
    assert_eq!(out.len(), text.len(), "same length");
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["a"].is_string());
    }
}

#[test]
fn skip_blanks_and_null_empties_malformed_lines() {
    let text = "{\"a\":1}\n{\"a\": \n\n[1,2]\n{\"a\":2}\nnot json";
    let (out, bad) = clean_all(BadRows::Skip, text);
    assert_eq!(out, "{\"a\":1}\n      \n\n     \n{\"a\":2}\n        ");
    assert_eq!(bad, vec![8, 16, 30]);
    let (out, _) = clean_all(BadRows::Null, text);
    assert_eq!(out, "{\"a\":1}\n{}    \n\n{}   \n{\"a\":2}\n{}      ");
    let (out, bad) = clean_all(BadRows::Fail, text);
    assert_eq!(
        (out.as_str(), bad.len()),
        (text, 0),
        "fail mode leaves them to the reader"
    );
}

async fn store_with(text: &str) -> (Arc<dyn ObjectStore>, Arc<LineRules>, ObjPath) {
    let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let path = ObjPath::from("data/t.jsonl");
    mem.put(&path, PutPayload::from(text.to_string()))
        .await
        .unwrap();
    let rules = Arc::new(LineRules::default());
    let store: Arc<dyn ObjectStore> =
        Arc::new(CleanLines::new(mem, "memory://".into(), rules.clone()));
    (store, rules, path)
}

#[tokio::test]
async fn every_split_of_a_file_reads_the_same_cleaned_bytes() {
    // Long lines (longer than the widening window), a malformed one among them.
    let good = format!("{{\"t\":\"{}\"}}\n", "x".repeat(150_000));
    let bad = format!("{{\"t\":\"{}\n", "y".repeat(100_000));
    let text = format!("{good}{bad}{good}{{\"t\":\"\\ud800\"}}\n{good}");
    let (store, rules, path) = store_with(&text).await;
    rules.set(
        "memory://",
        ObjPath::from("data"),
        BadRows::Skip,
        LineFormat::Json,
    );
    let whole = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(whole.len(), text.len());
    let expected = whole.clone();
    assert!(!String::from_utf8_lossy(&expected).contains('y'));
    for cut in [1, 1000, 150_009, 150_010, 200_000, 250_012, 400_000] {
        let mut joined = store.get_range(&path, 0..cut).await.unwrap().to_vec();
        joined.extend(
            store
                .get_range(&path, cut..text.len() as u64)
                .await
                .unwrap(),
        );
        assert_eq!(joined, expected.to_vec(), "split at {cut}");
    }
    // Read 16 KiB at a time, as DataFusion continues a range to its line's end.
    let mut pieces = Vec::new();
    for lo in (0..text.len() as u64).step_by(16 * 1024) {
        let hi = (lo + 16 * 1024).min(text.len() as u64);
        pieces.extend(store.get_range(&path, lo..hi).await.unwrap());
    }
    assert_eq!(pieces, expected.to_vec(), "in 16 KiB pieces");
    let report = rules.report().await;
    assert_eq!(report.len(), 1);
    assert_eq!(
        (report[0].count, report[0].first_lines.clone()),
        (1, vec![2])
    );
    assert_eq!(report[0].file, "memory:///data/t.jsonl");
}

#[tokio::test]
async fn other_objects_and_unruled_paths_pass_through() {
    let (store, rules, _) = store_with("").await;
    let raw = "{\"a\": \n\\ud800";
    let p = ObjPath::from("data/x.parquet");
    store
        .put(&p, PutPayload::from(raw.to_string()))
        .await
        .unwrap();
    assert_eq!(
        store.get(&p).await.unwrap().bytes().await.unwrap(),
        raw.as_bytes()
    );
    let j = ObjPath::from("other/x.jsonl");
    let malformed = "{\"a\": \n{}";
    store
        .put(&j, PutPayload::from(malformed.to_string()))
        .await
        .unwrap();
    let read = store.get(&j).await.unwrap().bytes().await.unwrap();
    assert_eq!(read, malformed.as_bytes(), "no rule: fail mode");
    assert!(rules.report().await.is_empty());
}

#[test]
fn csv_lines_with_the_wrong_number_of_fields_are_skipped_or_nulled() {
    let text = "a,b,c\n1,\"x, y\",3\n1,2\n4,5,6\r\n7,8,9,10\n\n";
    let kind = Kind::Csv {
        delimiter: b',',
        quote: b'"',
        fields: 3,
    };
    let run = |mode| {
        let mut c = Cleaner::new(mode, 0, kind);
        let mut out = c.push(text.as_bytes()).unwrap().1;
        out.extend(c.finish().map(|(_, b)| b).unwrap_or_default());
        (String::from_utf8(out).unwrap(), c.bad)
    };
    let (out, bad) = run(BadRows::Skip);
    assert_eq!(
        out,
        "a,b,c\n1,\"x, y\",3\n\n\n\n\n4,5,6\r\n\n\n\n\n\n\n\n\n\n\n"
    );
    assert_eq!(bad, vec![17, 28]);
    let (out, _) = run(BadRows::Null);
    assert_eq!(
        out,
        "a,b,c\n1,\"x, y\",3\n,,\n\n4,5,6\r\n,,\n\n\n\n\n\n\n\n"
    );
    assert_eq!(out.len(), text.len());
}

#[tokio::test]
async fn fail_mode_fixes_surrogates_across_chunks_and_ranges() {
    let text =
        "{\"a\":\"x\\ud800\"}\n{\"a\":\"\\ud83d\\ude00\\\\ud800\"}\n{\"a\":\"\\udc00 end\\\\\"}\n";
    let expected =
        "{\"a\":\"x\\ufffd\"}\n{\"a\":\"\\ud83d\\ude00\\\\ud800\"}\n{\"a\":\"\\ufffd end\\\\\"}\n";
    // Chunks of every size, as the store may deliver them.
    for size in 1..=13 {
        let chunks: Vec<object_store::Result<Bytes>> = text
            .as_bytes()
            .chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let s = super::fix::fixed(
            futures::stream::iter(chunks).boxed(),
            0,
            0..text.len() as u64,
        );
        let out: Vec<Bytes> = s.map(|b| b.unwrap()).collect().await;
        assert_eq!(out.concat(), expected.as_bytes(), "chunks of {size}");
    }
    // Every split of a ranged read agrees with the whole.
    let (store, _, path) = store_with(text).await;
    for cut in 0..text.len() as u64 {
        let mut joined = store
            .get_range(&path, 0..cut.max(1))
            .await
            .unwrap()
            .to_vec();
        joined.truncate(cut as usize);
        joined.extend(
            store
                .get_range(&path, cut..text.len() as u64)
                .await
                .unwrap(),
        );
        assert_eq!(joined, expected.as_bytes(), "split at {cut}");
    }
}
