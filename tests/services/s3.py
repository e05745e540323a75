"""S3 for tests: moto's standalone server as a real process on a loopback port.

Loaded as a pytest plugin (tests/conftest.py); the server starts only when a test asks for it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_SECONDS = 20
INSTALL_HINT = "moto's S3 server is not installed; run pip install -e '.[test]'"


class MotoServer:
    """`python -m moto.server` on 127.0.0.1, which fault tests may stop and start again."""

    def __init__(self, port: int, log_path: Path):
        self.port = port
        self.log_path = log_path
        self._process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (on the same port as before) unless it runs; wait until it answers."""
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                pytest.fail(f"moto's server exited with {self._process.returncode}:\n{self._log_tail()}")
            if self._answers():
                return
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"moto's server did not answer within {START_SECONDS} s:\n{self._log_tail()}")

    def stop(self) -> None:
        if self._process is None:
            return
        process, self._process = self._process, None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1).close()
        except urllib.error.HTTPError:
            return True  # any HTTP answer means it is serving
        except OSError:
            return False
        return True

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]


@dataclass(frozen=True)
class S3Env:
    """A fresh bucket on the moto server, with the AWS environment pointing at it."""

    url: str  # s3://bucket/prefix, as --store-url takes it
    bucket: str
    prefix: str
    endpoint_url: str


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> Iterator[MotoServer]:
    try:
        import moto.server  # noqa: F401  (the [server] extra: flask and werkzeug)
    except ImportError:
        pytest.fail(INSTALL_HINT)
    server = MotoServer(_free_port(), tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_server, monkeypatch, tmp_path) -> S3Env:
    import boto3

    moto_server.start()  # a fault test before this one may have left it stopped
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # Nothing from the developer's own AWS setup may reach the tests.
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    bucket = f"lgw-{uuid.uuid4().hex[:16]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return S3Env(f"s3://{bucket}/shared", bucket, "shared", moto_server.endpoint_url)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
