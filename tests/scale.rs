//! Bounded memory for large outputs: COPY cuts Parquet row groups by encoded bytes
//! (`[execution] parquet_row_group_bytes`), whatever the row count, so the writer never holds
//! more than about one row group. (Speed and peak RSS at 100 MB / 1 GB are measured by
//! `cargo bench --bench pipeline -- scale`.)

mod support;

use std::path::Path;

use datafusion::parquet::file::reader::{FileReader, SerializedFileReader};
use sluice::Engine;
use sluice::config::Config;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_cuts_row_groups_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::parse(
        "[cache]\nenabled = false\n[execution]\nparquet_row_group_bytes = \"1MB\"\n",
        Path::new("sluice.toml"),
        &|_| None,
    )
    .unwrap();
    cfg.udf_dir = dir.path().join("no-udfs");
    let e = Engine::new(&cfg).unwrap();
    let out = dir.path().join("wide.parquet");
    // 20,000 distinct rows of ~2 KB: ~40 MB, written uncompressed.
    let sql = format!(
        "COPY (SELECT v, repeat(CAST(v AS VARCHAR) || ' of the quarter', 100) AS text FROM \
         (SELECT unnest(range(20000)) AS v)) TO '{}' STORED AS PARQUET \
         OPTIONS ('format.compression' 'uncompressed');",
        out.display()
    );
    run(&e, &sql).await.unwrap();
    let reader = SerializedFileReader::new(std::fs::File::open(&out).unwrap()).unwrap();
    let meta = reader.metadata();
    let groups: Vec<i64> = meta
        .row_groups()
        .iter()
        .map(|g| g.compressed_size())
        .collect();
    let rows: i64 = meta.row_groups().iter().map(|g| g.num_rows()).sum();
    assert_eq!(rows, 20_000);
    assert!(
        groups.len() >= 20,
        "about 40 MB in 1 MB row groups: {groups:?}"
    );
    let largest = *groups.iter().max().unwrap();
    assert!(
        largest <= 4 << 20,
        "no row group far beyond the bound: largest {largest} bytes"
    );
}
