"""A real Flotilla master for the tests: `flotilla up` on a temporary
manifest, port 0, stopped (with its workers) at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Dict, Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parents[3]
# The source tree's package, unless FLOTILLA_TEST_INSTALLED=1 asks for the
# installed one (`.ci/run` tests what `pip install ./clients/python` made).
if os.environ.get("FLOTILLA_TEST_INSTALLED") != "1":
    sys.path.insert(0, str(ROOT / "clients" / "python"))

MANIFEST = """apiVersion: flotilla.dev/v1
kind: Cluster
metadata: { name: pytest }
spec:
  workers:
    - capacity: 64
      replicas: 2
  resources:
    - { name: total, type: Integer, initialValue: 0 }
"""


def flotilla_bin() -> str:
    """FLOTILLA_BIN, else target/debug/flotilla, else target/release/flotilla."""
    env = os.environ.get("FLOTILLA_BIN")
    if env:
        return env
    for profile in ("debug", "release"):
        path = ROOT / "target" / profile / "flotilla"
        if path.is_file():
            return str(path)
    raise RuntimeError("no flotilla binary: run `cargo build` first, or set FLOTILLA_BIN")


class Master:
    def __init__(self, manifest: str, env: Optional[Dict[str, str]] = None):
        self.dir = tempfile.TemporaryDirectory(prefix="flotilla-pytest-")
        path = Path(self.dir.name) / "cluster.yaml"
        path.write_text(manifest)
        full_env = dict(os.environ)
        full_env.pop("FLOTILLA_TOKEN", None)
        full_env.update(env or {})
        full_env.setdefault("RUST_LOG", "warn")
        # Its claim on the cluster name in a directory of its own, so that
        # masters of the same name elsewhere on the machine do not refuse it.
        full_env.setdefault("FLOTILLA_RUNTIME_DIR", str(Path(self.dir.name) / "run"))
        self.proc = subprocess.Popen(
            # Durable, in a state directory of its own (removed with the rest).
            [flotilla_bin(), "up", str(path), "--port", "0",
             "--state-dir", str(Path(self.dir.name) / "state")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        # Its log goes to ours (pytest shows it for a failing test).
        threading.Thread(target=self._drain, daemon=True).start()
        line = self.proc.stdout.readline()
        words = [w for w in line.split() if w.startswith("http://")]
        if not words:
            self.stop()
            raise RuntimeError(f"flotilla up printed no address: {line!r}")
        self.url = words[0]

    def _drain(self) -> None:
        for line in self.proc.stderr:
            sys.stderr.write("[master] " + line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.dir.cleanup()


def wait_ready(url: str, token: Optional[str] = None) -> None:
    from flotilla import Client

    import time

    client = Client(url, token=token)
    deadline = time.monotonic() + 30
    while True:
        nodes = client.nodes()
        if nodes and all(n["state"] == "active" for n in nodes):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers did not come up: {nodes}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def master() -> Iterator[Master]:
    m = Master(MANIFEST)
    try:
        wait_ready(m.url)
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="session")
def token_master() -> Iterator[Master]:
    m = Master(MANIFEST, env={"FLOTILLA_TOKEN": "py-s3cret"})
    try:
        wait_ready(m.url, token="py-s3cret")
        yield m
    finally:
        m.stop()


@pytest.fixture
def client(master: Master, monkeypatch: pytest.MonkeyPatch):
    from flotilla import Client

    monkeypatch.delenv("FLOTILLA_TOKEN", raising=False)
    with Client(master.url) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
