"""Fixtures: the project's own OpenAI-compatible test server (`sluice-mock-llm`, built by
`cargo build --bin sluice-mock-llm`), started as a subprocess and stopped by its PID.

Every answer of the server carries `[h]` with `h = prompt_hash(system, user)`, so a test can
prove that each output belongs to its row. `GET /stats` counts the requests it received.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"
MOCK_BIN = TARGET / "sluice-mock-llm"
SLUICE_BIN = TARGET / "sluice"
SHARED_DATA = ROOT.parent / "shared" / "data"


def prompt_hash(system, user):
    """The server's tag of a prompt: the first 12 hex digits of sha256(system + 0x1f + user)."""
    h = hashlib.sha256()
    h.update((system or "").encode())
    h.update("\x1f".encode())
    h.update(user.encode())
    return h.hexdigest()[:12]


class MockServer:
    """A running `sluice-mock-llm`: its base URL, its request counters, stop by PID."""

    def __init__(self, *flags):
        if not MOCK_BIN.exists():
            pytest.fail(f"{MOCK_BIN} is missing: cargo build --bin sluice-mock-llm")
        self.proc = subprocess.Popen(
            [str(MOCK_BIN), "--port", "0", *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline().strip()
        if not line.startswith("listening "):
            self.stop()
            pytest.fail(f"sluice-mock-llm did not start: {line!r} {self.proc.stderr.read()}")
        self.base_url = line.split(" ", 1)[1]
        self.root = self.base_url.rsplit("/v1", 1)[0]

    def stats(self):
        with urllib.request.urlopen(self.root + "/stats", timeout=10) as r:
            return json.loads(r.read())

    def requests(self):
        return self.stats()["requests"]

    def config(self, **dispatcher):
        """A sluice.toml as a dict whose default model is this server."""
        cfg = {"models": {"default": {"kind": "openai", "base_url": self.base_url, "model": "mock"}}}
        if dispatcher:
            cfg["dispatcher"] = dispatcher
        return cfg

    def toml(self, udf_dir, cache_dir, concurrency=64):
        return (
            f'udf_dir = "{udf_dir}"\n[dispatcher]\nconcurrency = {concurrency}\n'
            f'[cache]\ndir = "{cache_dir}"\n'
            f'[models.default]\nkind = "openai"\nbase_url = "{self.base_url}"\nmodel = "mock"\n'
        )

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def mock():
    server = MockServer("--latency-ms", "2")
    yield server
    server.stop()


@pytest.fixture
def mock_factory():
    started = []

    def start(*flags):
        server = MockServer(*flags)
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def python():
    return sys.executable
