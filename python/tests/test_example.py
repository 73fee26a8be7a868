"""The example script runs as documented, against the test server."""

import os
import subprocess

from conftest import ROOT


def test_quickstart_example(tmp_path, mock, python):
    env = dict(os.environ, SLUICE_BASE_URL=mock.base_url, SLUICE_CACHE_DIR=str(tmp_path / "cache"))
    before = mock.requests()
    out = subprocess.run([python, str(ROOT / "python/examples/quickstart.py")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "sentiment" in out.stdout
    assert "3 requests, 0 answered by the cache" in out.stdout
    assert mock.requests() - before == 3
    # Run again: every answer comes from the cache.
    again = subprocess.run([python, str(ROOT / "python/examples/quickstart.py")], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "0 requests, 3 answered by the cache" in again.stdout
