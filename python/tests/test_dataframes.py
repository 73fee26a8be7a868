"""Python tables in, an LLM function per row, pandas / Polars / PyArrow out."""

import asyncio
import threading

import pandas as pd
import pyarrow as pa
import pytest
import sluice

from conftest import prompt_hash

# The acceptance's size: one call per row, each answer its own row's.
ROWS = 10_000

LABEL = {
    "name": "label",
    "description": "A short label for a review",
    "args": ["text"],
    "prompt": "Label this review: {{ text }}",
    "max_tokens": 40,
}


def test_a_dataframe_in_one_call_per_row_pandas_out(tmp_path, mock):
    con = sluice.connect(
        mock.config(concurrency=128), udfs=tmp_path / "no-udfs", cache_dir=tmp_path / "cache"
    )
    assert con.define_function(LABEL) == "label"
    df = pd.DataFrame({"id": range(ROWS), "text": [f"review number {i}" for i in range(ROWS)]})
    con.register("reviews", df)
    before = mock.requests()
    out = con.sql(
        "SELECT id, text, label(text) AS label, label_error(text) AS label_error FROM reviews"
    ).to_pandas().sort_values("id")
    assert mock.requests() - before == ROWS
    assert len(out) == ROWS
    assert list(out["id"]) == list(range(ROWS))
    # Each answer belongs to its own row: it carries the hash of that row's prompt.
    for text, label in zip(out["text"], out["label"]):
        assert f"[{prompt_hash(None, f'Label this review: {text}')}]" in label
    assert out["label_error"].isna().all()
    m = con.metrics()
    assert m["requests"] == ROWS
    assert m["functions"]["label"]["prompts"] == ROWS
    # A second run is answered by the cache.
    again = con.sql("SELECT label(text) AS label FROM reviews")
    assert again.num_rows == ROWS
    assert con.metrics()["requests"] == 0
    assert con.metrics()["cache_hits"] == ROWS


def test_error_columns_are_typed_and_failures_keep_their_rows(tmp_path, mock_factory):
    failing = mock_factory("--server-500", "1")
    con = sluice.connect(
        failing.config(max_attempts=2, backoff_base_ms=1, backoff_max_ms=2),
        udfs=tmp_path / "no-udfs",
        cache=False,
    )
    con.define_function(LABEL)
    con.register("reviews", pa.table({"text": ["a", "b", "c"]}))
    t = con.sql("SELECT text, label(text) AS label, label_error(text) AS err FROM reviews").to_arrow()
    assert t.num_rows == 3
    assert t.column("label").null_count == 3
    err_type = t.schema.field("err").type
    assert pa.types.is_struct(err_type)
    names = {err_type.field(i).name for i in range(err_type.num_fields)}
    assert {"kind", "message"} <= names
    kinds = {e["kind"] for e in t.column("err").to_pylist()}
    assert kinds and None not in kinds


def test_polars_and_arrow_in_and_out(tmp_path, mock):
    pl = pytest.importorskip("polars")
    con = sluice.connect(mock.config(), udfs=tmp_path / "no-udfs", cache=False)
    con.define_function(LABEL)
    con.register("p", pl.DataFrame({"text": ["x", "y"]}))
    con.register("a", pa.table({"n": [1, 2, 3]}))
    r = con.sql("SELECT text, label(text) AS l FROM p ORDER BY text")
    assert r.to_polars().shape == (2, 2)
    # Zero-copy consumers read the Arrow C stream directly.
    assert pa.table(r).num_rows == 2
    assert sum(b.num_rows for b in r) == 2
    assert con.sql("SELECT sum(n) AS s FROM a").to_pylist() == [{"s": 6}]


def test_files_as_tables(tmp_path, mock):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "t.parquet")
    pacsv.write_csv(pa.table({"y": [3, 4, 5]}), tmp_path / "t.csv")
    (tmp_path / "t.jsonl").write_text('{"z": 1}\n{"z": 2}\nnot json\n')
    con = sluice.connect(mock.config(), udfs=tmp_path / "no-udfs", cache=False)
    con.register_parquet("tp", tmp_path / "t.parquet")
    con.register_csv("tc", tmp_path / "t.csv")
    con.register_json("tj", tmp_path / "t.jsonl", bad_rows="skip")
    got = con.sql(
        "SELECT (SELECT sum(x) FROM tp) AS x, (SELECT sum(y) FROM tc) AS y, "
        "(SELECT sum(z) FROM tj) AS z"
    ).to_pylist()
    assert got == [{"x": 3, "y": 12, "z": 3}]


def test_from_a_thread_and_inside_a_running_event_loop(tmp_path, mock):
    con = sluice.connect(mock.config(), udfs=tmp_path / "no-udfs", cache=False)
    con.define_function(LABEL)
    con.register("t", pa.table({"text": [f"t{i}" for i in range(20)]}))
    query = "SELECT label(text) AS l FROM t"
    results = []
    threads = [threading.Thread(target=lambda: results.append(con.sql(query).num_rows)) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert results == [20, 20, 20]

    async def in_a_loop():
        # As in a notebook cell: the loop is running while the statement runs.
        await asyncio.sleep(0)
        return con.sql(query).num_rows

    assert asyncio.run(in_a_loop()) == 20


def test_functions_from_toml_text_and_a_directory(tmp_path, mock):
    d = tmp_path / "fns"
    d.mkdir()
    (d / "shout.toml").write_text('name = "shout"\nargs = ["x"]\nprompt = "Shout {{ x }}"\n')
    con = sluice.connect(mock.config(), udfs=tmp_path / "no-udfs", cache=False)
    assert con.load_functions(d) == ["shout"]
    assert con.define_function('name = "whisper"\nargs = ["x"]\nprompt = "Whisper {{ x }}"\n') == "whisper"
    names = [f["name"] for f in con.functions()]
    assert names == ["llm", "shout", "whisper"]
    assert con.functions()[1]["args"] == ["x"]
    row = con.sql("SELECT shout('a') AS s, whisper('b') AS w").to_pylist()[0]
    assert f"[{prompt_hash(None, 'Shout a')}]" in row["s"]
    assert f"[{prompt_hash(None, 'Whisper b')}]" in row["w"]


def test_explain_counts_calls_without_sending(tmp_path, mock):
    con = sluice.connect(mock.config(), udfs=tmp_path / "no-udfs", cache=False)
    con.define_function(LABEL)
    con.register("t", pa.table({"text": [f"t{i}" for i in range(7)]}))
    before = mock.requests()
    x = con.explain("SELECT label(text) FROM t")
    assert mock.requests() == before
    assert x.calls == 7
    assert x.tokens_in > 0 and x.tokens_out > 0
    assert x.to_dict()["functions"][0]["function"] == "label"
    assert "label" in str(x)


def test_order_by_holds_over_an_llm_call(tmp_path, mock):
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["b", "a", "c"]}), tmp_path / "t.parquet")
    con = sluice.connect(mock.config(), udfs=tmp_path / "no-udfs", cache=False)
    con.define_function(LABEL)
    con.register_parquet("t", tmp_path / "t.parquet")
    rows = con.sql("SELECT text, label(text) AS l FROM t ORDER BY text").to_pylist()
    assert [r["text"] for r in rows] == ["a", "b", "c"]
