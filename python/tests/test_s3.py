"""Tables on s3:// locations, against a local S3-compatible server (moto, from the environment
scripts/test.sh creates: $SLUICE_MOTO_SERVER or .venv-moto/bin/moto_server)."""

import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
import sluice

from conftest import ROOT, prompt_hash


def _moto_binary():
    path = os.environ.get("SLUICE_MOTO_SERVER") or str(ROOT / ".venv-moto/bin/moto_server")
    if not os.path.exists(path):
        pytest.fail(f"moto_server not found at {path}: run scripts/test.sh (it creates .venv-moto)")
    return path


@pytest.fixture
def moto(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([_moto_binary(), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "moto did not start in 30 s"
            time.sleep(0.05)
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    yield endpoint
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)


def test_parquet_on_s3_in_and_out(tmp_path, mock, moto):
    urllib.request.urlopen(urllib.request.Request(moto + "/bucket", method="PUT"), timeout=10)
    con = sluice.connect(mock.config(), udfs=tmp_path / "none", cache=False)
    con.define_function({"name": "label", "args": ["text"], "prompt": "Label: {{ text }}"})
    con.sql("COPY (SELECT 'a' AS text UNION ALL SELECT 'b') "
            "TO 's3://bucket/in/t.parquet' STORED AS PARQUET")
    con.register_parquet("t", "s3://bucket/in/t.parquet")
    rows = con.sql("SELECT text, label(text) AS l FROM t").to_pylist()
    assert sorted(r["text"] for r in rows) == ["a", "b"]
    for r in rows:
        assert f"[{prompt_hash(None, 'Label: ' + r['text'])}]" in r["l"]
    with pytest.raises(sluice.PlanError):
        con.register_parquet("missing", "s3://no-such-bucket/t.parquet")
        con.sql("SELECT * FROM missing")
