"""The flagship query from Python returns what `sluice run` returns."""

import json
import shutil
import subprocess

import pyarrow.parquet as pq
import sluice

from conftest import ROOT, SHARED_DATA, SLUICE_BIN


def _workdir(tmp_path, name):
    d = tmp_path / name
    (d / "data" / "transcripts").mkdir(parents=True)
    shutil.copy(
        SHARED_DATA / "earnings_transcript_excerpts.jsonl",
        d / "data" / "transcripts" / "excerpts.jsonl",
    )
    return d


def _sorted_rows(table):
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in table.to_pylist())


def test_flagship_matches_the_cli(tmp_path, mock, monkeypatch):
    # The command line, in a directory of its own.
    cli_dir = _workdir(tmp_path, "cli")
    (cli_dir / "sluice.toml").write_text(mock.toml(ROOT / "udfs", cli_dir / "cache"))
    out = subprocess.run(
        [str(SLUICE_BIN), "--config", "sluice.toml", "run", str(ROOT / "queries/earnings_qa.sql"),
         "--format", "json", "--quiet"],
        cwd=cli_dir, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    cli_rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert len(cli_rows) == 5

    # Python, in another, with a cache of its own: it calls the server itself.
    py_dir = _workdir(tmp_path, "py")
    monkeypatch.chdir(py_dir)
    before = mock.requests()
    con = sluice.connect(mock.config(), udfs=ROOT / "udfs", cache_dir=py_dir / "cache")
    result = con.run_file(ROOT / "queries/earnings_qa.sql")
    sent = mock.requests() - before
    assert result.columns == ["company", "quarter", "question", "answer"]
    assert sorted(json.dumps(r, sort_keys=True) for r in result.to_pylist()) == sorted(
        json.dumps(r, sort_keys=True) for r in cli_rows
    )
    # Every row of the written Parquet is the same, and the answers are the server's.
    cli_out = pq.read_table(cli_dir / "out" / "earnings_qa.parquet")
    py_out = pq.read_table(py_dir / "out" / "earnings_qa.parquet")
    assert py_out.num_rows == cli_out.num_rows > 0
    assert py_out.schema == cli_out.schema
    assert _sorted_rows(py_out) == _sorted_rows(cli_out)
    answers = py_out.column("answer").to_pylist()
    assert all(a is not None and "[" in a for a in answers)
    m = con.metrics()
    assert m["requests"] == sent > 0
    assert m["functions"]["answer_question"]["prompts"] == py_out.num_rows
