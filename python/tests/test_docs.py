"""The Python examples of README.md and docs/*.md run: each file's ```python blocks, in order, as
one script, in a directory laid out like the repository (udfs/, queries/, the transcripts), with
the test server as the default model ($SLUICE_CONFIG)."""

import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT, SHARED_DATA

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(path):
    return FENCE.findall(path.read_text())


@pytest.mark.parametrize("doc", [d for d in DOCS if _blocks(d)], ids=lambda d: d.name)
def test_python_examples_run(doc, tmp_path, mock, python):
    shutil.copytree(ROOT / "udfs", tmp_path / "udfs")
    shutil.copytree(ROOT / "queries", tmp_path / "queries")
    (tmp_path / "data" / "transcripts").mkdir(parents=True)
    shutil.copy(SHARED_DATA / "earnings_transcript_excerpts.jsonl",
                tmp_path / "data" / "transcripts" / "excerpts.jsonl")
    (tmp_path / "sluice.toml").write_text(mock.toml("udfs", ".sluice/cache"))
    script = tmp_path / "doc_examples.py"
    script.write_text("\n".join(_blocks(doc)))
    env = dict(os.environ, SLUICE_CONFIG=str(tmp_path / "sluice.toml"))
    before = mock.requests()
    out = subprocess.run([python, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert mock.requests() > before
