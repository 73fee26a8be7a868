"""The Python package's overhead over the `sluice` command: the flagship
(queries/earnings_qa.sql) over a corpus from `sluice gen-corpus`, every answer already in the
cache, run by `sluice run` and by `session.run_file`, alternately, N times each.

    python python/benches/overhead.py --size 100MB --runs 5 [--target target/release]

It starts sluice-mock-llm (from the same target directory) for the first run, which fills the
cache; the timed runs send nothing. Prints the median of each and their ratio: for the whole
Python process, and for the session alone (connect, run, to_arrow) once the interpreter has
imported sluice and pyarrow, as in a notebook.
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="100MB")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--target", default=str(ROOT / "target" / "release"))
    a = p.parse_args()
    target = Path(a.target).resolve()
    work = Path(tempfile.mkdtemp(prefix="sluice-overhead-"))
    (work / "data" / "transcripts").mkdir(parents=True)
    subprocess.run([target / "sluice", "gen-corpus", "--out", work / "data/transcripts/corpus.jsonl",
                    "--size", a.size], check=True)
    mock = subprocess.Popen([target / "sluice-mock-llm", "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        base_url = mock.stdout.readline().split()[1]
        (work / "sluice.toml").write_text(
            f'udf_dir = "{ROOT / "udfs"}"\n[dispatcher]\nconcurrency = 256\n'
            f'[models.default]\nkind = "openai"\nbase_url = "{base_url}"\nmodel = "mock"\n'
        )
        cli = [str(target / "sluice"), "--config", "sluice.toml", "run", str(ROOT / "queries/earnings_qa.sql"), "-q"]
        subprocess.run(cli, cwd=work, check=True, stdout=subprocess.DEVNULL)  # fills the cache
        # The Python process prints how long the session took once the interpreter and the
        # imports were up (what a notebook's cell costs).
        py = [sys.executable, "-c",
              "import time, sluice, pyarrow\n"
              "t = time.perf_counter()\n"
              "sluice.connect('sluice.toml').run_file(%r).to_arrow()\n"
              "print(time.perf_counter() - t)" % str(ROOT / "queries/earnings_qa.sql")]
        times = {"cli": [], "python": [], "session": []}
        for _ in range(a.runs):
            for name, cmd in (("cli", cli), ("python", py)):
                start = time.perf_counter()
                out = subprocess.run(cmd, cwd=work, check=True, stdout=subprocess.PIPE, text=True)
                times[name].append(time.perf_counter() - start)
                if name == "python":
                    times["session"].append(float(out.stdout.split()[-1]))
        cli_s, py_s, session_s = (statistics.median(times[k]) for k in ("cli", "python", "session"))
        print(f"corpus {a.size}, {a.runs} runs each, {target.name} build: sluice run {cli_s:.2f} s, "
              f"Python process {py_s:.2f} s (ratio {py_s / cli_s:.3f}), of which the session "
              f"{session_s:.2f} s (ratio {session_s / cli_s:.3f}); medians")
    finally:
        os.kill(mock.pid, signal.SIGTERM)
        mock.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
