"""A real app server for the app's tests: ``python app/app.py`` in its own process, on a free port, with a temporary
workspace, offline.  ``AppServer.client()`` is a real ``gradio_client.Client``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: screenshots of the browser tests land here (CI keeps them as artifacts; look at them after a change to the UI)
ARTIFACTS = Path(os.environ.get("FINETUNE_HELPER_TEST_ARTIFACTS", REPO / "test-artifacts"))
#: a fake Hub token in the server's environment: it must never appear in anything the app sends back
FAKE_TOKEN = "hf_FakeTokenForTests0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    def __init__(self, workspace: Path, log: Path, *extra: str) -> None:
        self.workspace = workspace
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        #: the server's (and its runs') temporary folder: its own, so that a test can watch what its runs leave there
        #: while other tests (pytest-xdist's other worker) use theirs
        self.tmp = workspace.parent / f"tmp-{self.port}"
        self.tmp.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "GRADIO_ANALYTICS_ENABLED": "False", "HF_TOKEN": FAKE_TOKEN, "TMPDIR": str(self.tmp),
               "GRADIO_TEMP_DIR": str(workspace.parent / f"gradio-tmp-{self.port}")}
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "app" / "app.py"), "--port", str(self.port), "--workspace", str(workspace),
             *extra], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=workspace.parent)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError as exc:
                if getattr(exc, "code", None) == 401:  # up, and asking for the login
                    return
                time.sleep(0.3)
        self.close()
        raise RuntimeError(f"the app did not answer within 90 s:\n{log.read_text()}")

    def client(self, **kwargs):
        from gradio_client import Client

        return Client(self.url, verbose=False, **kwargs)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def app_workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app") / "workspace"


@pytest.fixture(scope="session")
def app_server(app_workspace, tmp_path_factory):
    server = AppServer(app_workspace, tmp_path_factory.mktemp("app-log") / "app.log")
    yield server
    server.close()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")
