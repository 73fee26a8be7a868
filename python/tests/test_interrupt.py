"""Ctrl-C during a statement: KeyboardInterrupt within 2 s, the answers received stay in the
cache, and running the statement again sends only the rest."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROWS = 120

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import pyarrow as pa
    import sluice

    base_url, cache_dir, udfs, mode = sys.argv[1:5]
    con = sluice.connect(
        {"dispatcher": {"concurrency": 8},
         "models": {"default": {"kind": "openai", "base_url": base_url, "model": "mock"}}},
        udfs=udfs, cache_dir=cache_dir)
    con.define_function({"name": "label", "args": ["text"], "prompt": "Label {{ text }}"})
    con.register("t", pa.table({"text": [f"row {i}" for i in range(%d)]}))
    query = "SELECT text, label(text) AS l FROM t"
    if mode.startswith("interrupt"):
        # A table whose malformed line is skipped: the rule holds after the interrupt too.
        lines = cache_dir + "-lines.jsonl"
        with open(lines, "w") as f:
            f.write(chr(10).join(['{"n": 1}', '{"n": ', '{"n": 3}', ""]))
        con.register_json("j", lines, bad_rows="skip")
        print("started", flush=True)
        try:
            if mode == "interrupt-stream":
                for batch in con.stream(query):
                    pass
            else:
                con.sql(query)
            print(json.dumps({"finished": True}), flush=True)
        except KeyboardInterrupt:
            at = time.monotonic()
            print(json.dumps({"interrupted": at, "metrics": con.metrics()}), flush=True)
        # The session goes on after an interrupt: the same statement sends only the rest.
        r = con.sql(query)
        print(json.dumps({"rows": r.num_rows, "metrics": con.metrics(),
                          "nulls": r.to_arrow().column("l").null_count,
                          "json": con.sql("SELECT sum(n) AS s FROM j").to_pylist()}),
              flush=True)
    else:
        r = con.sql(query)
        print(json.dumps({"rows": r.num_rows, "metrics": con.metrics(),
                          "nulls": r.to_arrow().column("l").null_count}), flush=True)
    """
    % ROWS
)


def _lines(proc, timeout):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


@pytest.mark.parametrize("mode", ["interrupt", "interrupt-stream"])
def test_interrupt_keeps_the_cache_and_a_rerun_sends_only_the_rest(
    tmp_path, mock_factory, python, mode
):
    mock = mock_factory("--latency-ms", "300")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    args = [mock.base_url, str(tmp_path / "cache"), str(tmp_path / "no-udfs")]

    child = subprocess.Popen(
        [python, str(script), *args, mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert child.stdout.readline().strip() == "started"
    time.sleep(1.2)
    sent_at = time.monotonic()
    child.send_signal(signal.SIGINT)
    lines, err = _lines(child, 60)
    first = lines[0]
    assert "interrupted" in first, (lines, err)
    assert first["interrupted"] - sent_at < 2.0
    done_before = first["metrics"]["succeeded"]
    assert 0 < done_before < ROWS
    again = lines[1]
    assert again["rows"] == ROWS and again["nulls"] == 0
    assert again["json"] == [{"s": 4}], "the bad_rows rule is lost after the interrupt"
    assert again["metrics"]["cache_hits"] == done_before
    assert again["metrics"]["requests"] == ROWS - done_before
    # Every request the server received was answered and kept: none was sent twice.
    assert mock.requests() == ROWS

    # A new process with the same cache finds every answer there.
    rerun = subprocess.Popen(
        [python, str(script), *args, "rerun"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    (result,), _ = _lines(rerun, 120)
    assert result["rows"] == ROWS and result["nulls"] == 0
    assert result["metrics"]["cache_hits"] == ROWS
    assert result["metrics"]["requests"] == 0
    assert mock.requests() == ROWS


THREADS_CHILD = textwrap.dedent(
    """
    import json, sys, threading
    import pyarrow as pa
    import sluice

    base_url, cache_dir = sys.argv[1:3]
    con = sluice.connect(
        {"dispatcher": {"concurrency": 4},
         "models": {"default": {"kind": "openai", "base_url": base_url, "model": "mock"}}},
        udfs=cache_dir + "/none", cache_dir=cache_dir)
    con.define_function({"name": "label", "args": ["text"], "prompt": "Label {{ text }}"})
    con.register("a", pa.table({"text": [f"a {i}" for i in range(80)]}))
    con.register("b", pa.table({"text": [f"b {i}" for i in range(80)]}))
    seen = {}

    def other():
        try:
            con.sql("SELECT label(text) FROM b")
            seen["other"] = "finished"
        except sluice.SluiceError as e:
            seen["other"] = type(e).__name__

    worker = threading.Thread(target=other)
    worker.start()
    print("started", flush=True)
    try:
        con.sql("SELECT label(text) FROM a")
        seen["main"] = "finished"
    except KeyboardInterrupt:
        seen["main"] = "KeyboardInterrupt"
    worker.join(timeout=20)
    seen["joined"] = not worker.is_alive()
    seen["after"] = con.sql("SELECT label(text) AS l FROM a").num_rows
    print(json.dumps(seen), flush=True)
    """
)


def test_an_interrupt_stops_the_other_threads_statements_too(tmp_path, mock_factory, python):
    mock = mock_factory("--latency-ms", "300")
    script = tmp_path / "threads.py"
    script.write_text(THREADS_CHILD)
    child = subprocess.Popen([python, str(script), mock.base_url, str(tmp_path / "cache")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "started"
    time.sleep(1.0)
    child.send_signal(signal.SIGINT)
    (seen,), err = _lines(child, 60)
    assert seen == {"main": "KeyboardInterrupt", "other": "SluiceError", "joined": True,
                    "after": 80}, err
