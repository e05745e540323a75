"""One real gateway as a user who is not root, with secrets in its environment, for the session.

As the images run it: an admin key given as a flag, and a catalog URL, store credentials, a
database password and a hub token in its environment, each value a canary to look for.
tests/security/test_secrets.py reads its children; tests/security/test_orphans.py then kills it
with SIGKILL, last (the `last` marker), so that one engine start serves both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.engine.conftest import RunningGateway, start_gateway, stop_gateway
from tests.security.nonroot import NOBODY, as_nobody, is_root, open_folder

ROOT = Path(__file__).resolve().parents[2]
ADMIN_KEY = "canary-admin-flag-7c41-long-enough-to-be-a-key"
SECRETS = {
    "LORA_GATEWAY_CATALOG_URL": None,  # set per gateway: a catalog under its folder, its name a canary
    "LORA_GATEWAY_METRICS_KEY": "canary-metrics-key-2e9a-long-enough-for-a-key",
    "AWS_ACCESS_KEY_ID": "canary-aws-key-id-51f0",
    "AWS_SECRET_ACCESS_KEY": "canary-aws-secret-93d2",
    "PGPASSWORD": "canary-pg-password-0b77",
    "HF_TOKEN": "canary-hf-token-d15e",
}
CATALOG_CANARY = "canary-catalog-8f3e"


@dataclass
class NobodyGateway:
    """The running gateway, the folder nobody owns that holds its demo and state, and the canaries."""

    running: RunningGateway
    folder: Path
    canaries: list[str]

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}


def nobody_folder(prefix: str) -> Path:
    folder = open_folder(prefix)
    if is_root():
        os.chown(folder, NOBODY, NOBODY)
    return folder


@contextmanager
def gateway_as_nobody(demo) -> Iterator[NobodyGateway]:
    """Start it on a copy of the demo; stop it (if a test did not kill it) and remove its folder."""
    folder = nobody_folder("lgw-secrets-")
    try:
        shutil.copytree(demo.root, folder / "demo")
        for sub in ("state", "home"):
            (folder / sub).mkdir()
        if is_root():
            subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(folder)], check=True)
        secrets = {**SECRETS, "LORA_GATEWAY_CATALOG_URL": f"sqlite:///{folder}/state/{CATALOG_CANARY}.sqlite3"}
        canaries = [ADMIN_KEY, CATALOG_CANARY, *(value for value in secrets.values())]
        env = {**secrets, "HOME": str(folder / "home"), "XDG_CACHE_HOME": str(folder / "home" / ".cache")}
        python_path = [Path(entry) for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
        args = ["--demo-dir", str(folder / "demo"), "--state-dir", str(folder / "state"), "--admin-key", ADMIN_KEY]
        prefix = as_nobody([], folder, [ROOT, *python_path])
        running = start_gateway(args, folder / "gateway.log", "demo", env=env, prefix=prefix)
        try:
            yield NobodyGateway(running, folder, canaries)
        finally:
            stop_gateway(running)
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)
