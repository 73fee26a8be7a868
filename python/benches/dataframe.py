"""A pandas DataFrame of N rows through an LLM function and back to pandas, against the
project's test server: one request per row, then the same statement answered by the cache.

    python python/benches/dataframe.py --rows 10000 [--latency-ms 20] [--target target/release]
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import sluice

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--latency-ms", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--target", default=str(ROOT / "target" / "release"))
    a = p.parse_args()
    mock_bin = Path(a.target).resolve() / "sluice-mock-llm"
    mock = subprocess.Popen([mock_bin, "--port", "0", "--latency-ms", str(a.latency_ms)],
                            stdout=subprocess.PIPE, text=True)
    try:
        base_url = mock.stdout.readline().split()[1]
        con = sluice.connect(
            {"dispatcher": {"concurrency": a.concurrency},
             "models": {"default": {"kind": "openai", "base_url": base_url, "model": "mock"}}},
            udfs=os.path.join(tempfile.gettempdir(), "sluice-no-udfs"),
            cache_dir=tempfile.mkdtemp(prefix="sluice-df-bench-"))
        con.define_function({"name": "label", "args": ["text"], "prompt": "Label: {{ text }}"})
        df = pd.DataFrame({"id": range(a.rows), "text": [f"review {i}" for i in range(a.rows)]})
        query = "SELECT id, label(text) AS label, label_error(text) AS error FROM reviews"
        for what in ("live", "cached"):
            start = time.perf_counter()
            con.register("reviews", df)
            out = con.sql(query).to_pandas()
            took = time.perf_counter() - start
            m = con.metrics()
            assert len(out) == a.rows and out["label"].notna().all()
            print(f"{what}: {a.rows} rows in {took:.2f} s ({a.rows / took:,.0f} rows/s), "
                  f"{m['requests']} requests, {m['cache_hits']} cache hits")
    finally:
        os.kill(mock.pid, signal.SIGTERM)
        mock.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
