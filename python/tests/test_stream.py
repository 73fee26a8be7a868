"""Large results batch by batch (`Session.stream`), and progress shown while statements run."""

import io
import sys
import time
import types

import pyarrow as pa
import pytest
import sluice
from sluice import _progress

from conftest import prompt_hash

ROWS = 400

LABEL = {"name": "label", "args": ["text"], "prompt": "Label {{ text }}"}


def _session(tmp_path, mock, **kw):
    con = sluice.connect(
        mock.config(concurrency=8), udfs=tmp_path / "no-udfs", cache_dir=tmp_path / "cache", **kw
    )
    con.define_function(LABEL)
    con.register("t", pa.table({"id": list(range(ROWS)), "text": [f"row {i}" for i in range(ROWS)]}))
    return con


def _check_rows(batches):
    table = pa.Table.from_batches(batches)
    assert table.num_rows == ROWS
    assert sorted(table.column("id").to_pylist()) == list(range(ROWS))
    for text, label in zip(table.column("text").to_pylist(), table.column("l").to_pylist()):
        assert f"[{prompt_hash(None, f'Label {text}')}]" in label


def test_a_stream_computes_each_batch_when_it_is_read(tmp_path, mock_factory):
    mock = mock_factory("--latency-ms", "20")
    con = _session(tmp_path, mock)
    with con.stream("SELECT id, text, label(text) AS l FROM t") as rows:
        assert rows.columns == ["id", "text", "l"]
        assert rows.schema.field("l").type == pa.string()
        first = next(rows)
        # Reading stops, and so do the calls: the engine reads only a bounded way ahead.
        time.sleep(0.5)
        held = mock.requests()
        assert held < ROWS // 2, f"{held} of {ROWS} rows were asked before the second batch"
        batches = [first, *rows]
        assert rows.ended
    _check_rows(batches)
    # Every row was asked once, and the session's last statement is this one.
    assert mock.requests() == ROWS
    assert con.metrics()["requests"] == ROWS


def test_a_closed_stream_stops_its_calls_and_a_rerun_sends_only_the_rest(tmp_path, mock_factory):
    mock = mock_factory("--latency-ms", "20")
    con = _session(tmp_path, mock)
    query = "SELECT id, text, label(text) AS l FROM t"
    rows = con.stream(query)
    next(rows)
    rows.close()
    assert rows.ended and list(rows) == []
    # Requests already written reach the server soon after the close; none is sent after.
    time.sleep(1.0)
    stopped_at = mock.requests()
    assert stopped_at < ROWS
    time.sleep(0.3)
    assert mock.requests() == stopped_at, "a closed stream went on calling"
    # The answers received were kept: the statement again sends the rest (and at most the
    # calls that were on the wire at the close, 8, a second time).
    _check_rows(con.sql(query).to_arrow().to_batches())
    assert ROWS <= mock.requests() <= ROWS + 8


def test_a_stream_reads_into_arrow_consumers_and_ends_with_non_queries(tmp_path, mock):
    con = _session(tmp_path, mock)
    reader = pa.RecordBatchReader.from_stream(con.stream("SELECT id, text, label(text) AS l FROM t"))
    _check_rows(list(reader))
    assert con.stream("SELECT id, text, label(text) AS l FROM t").to_pandas().shape == (ROWS, 3)
    ddl = con.stream("CREATE VIEW v AS SELECT id FROM t WHERE id < 3")
    assert ddl.ended and list(ddl) == [] and ddl.columns == []
    assert con.stream("SELECT count(*) AS n FROM v").to_arrow().to_pylist() == [{"n": 3}]


def test_a_stream_raises_the_statements_errors(tmp_path, mock):
    con = _session(tmp_path, mock)
    with pytest.raises(sluice.PlanError, match="no_such_table"):
        con.stream("SELECT * FROM no_such_table")
    # A failing statement before the last stops the script there.
    with pytest.raises(sluice.PlanError, match="statement 1"):
        con.stream("SELECT * FROM missing_one; SELECT 1")


def test_progress_is_handed_the_lines_of_each_statement(tmp_path, mock_factory):
    mock = mock_factory("--latency-ms", "20")
    seen = []
    con = _session(tmp_path, mock, progress=lambda lines, finished: seen.append((lines, finished)))
    con.sql("SELECT label(text) AS l FROM t")
    assert seen and seen[-1][1] is True and all(not f for _, f in seen[:-1])
    (name, text), = seen[-1][0]
    assert name == "label" and text.startswith(f"{ROWS} / {ROWS} prompts"), text
    # The next statement counts from zero: all of it from the cache.
    seen.clear()
    con.sql("SELECT label(text) AS l FROM t WHERE id < 10")
    (name, text), = seen[-1][0]
    assert text.startswith("10 / 10 prompts") and "10 cached" in text, text
    # A statement's own setting wins over the session's.
    seen.clear()
    con.sql("SELECT label(text) AS l FROM t", progress=False)
    assert seen == []


def test_a_display_that_fails_does_not_stop_the_statement(tmp_path, mock, capsys):
    def broken(lines, finished):
        raise RuntimeError("display broke")

    con = _session(tmp_path, mock, progress=broken)
    assert con.sql("SELECT label(text) AS l FROM t").num_rows == ROWS
    assert "display broke" in capsys.readouterr().err


def test_the_terminal_display_redraws_in_place():
    out = io.StringIO()
    show = _progress.Terminal(out)
    show([("label", "1 / 4 prompts"), ("answer", "0 / 2 prompts")], False)
    show([("label", "4 / 4 prompts"), ("answer", "2 / 2 prompts")], True)
    first, second = out.getvalue().split("\x1b[2F\x1b[J")
    assert first.startswith("label 1 / 4 prompts [0s]\n") and first.count("\n") == 2
    assert second == "label 4 / 4 prompts [0s]\nanswer 2 / 2 prompts [0s]\n"
    # After the last state, a new statement draws below it.
    show([("label", "1 / 1 prompts")], False)
    assert out.getvalue().endswith("answer 2 / 2 prompts [0s]\nlabel 1 / 1 prompts [0s]\n")


def test_the_notebook_display_updates_one_output(monkeypatch):
    shown = []

    class Handle:
        def update(self, obj):
            shown.append(("update", obj))

    def display(obj, display_id=False):
        assert display_id is True
        shown.append(("display", obj))
        return Handle()

    fake = types.ModuleType("IPython.display")
    fake.display = display
    fake.Pretty = lambda text: text
    monkeypatch.setitem(sys.modules, "IPython.display", fake)
    show = _progress.Notebook()
    show([], False)
    show([("label", "1 / 4 prompts")], False)
    show([("label", "4 / 4 prompts")], True)
    assert shown == [("display", "label 1 / 4 prompts [0s]"), ("update", "label 4 / 4 prompts [0s]")]


def test_progress_settings():
    # Under pytest stderr is no terminal and there is no notebook: nothing is drawn by default.
    assert _progress.display_for(None) is None
    assert isinstance(_progress.display_for(True), _progress.Plain)
    assert _progress.display_for(False) is None
    assert isinstance(_progress.display_for("terminal"), _progress.Terminal)
    with pytest.raises(ValueError, match="progress: expected"):
        sluice.connect(progress="sometimes")
