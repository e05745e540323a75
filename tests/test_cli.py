"""server/commands/cli.py: the shared-state flags, and their secrets kept out of help, logs and messages."""

from __future__ import annotations

import logging
import subprocess
import sys

from server import gateway as cli
from server.config import Settings


def test_help_never_shows_a_catalog_password_from_the_environment():
    env = {"LORA_GATEWAY_CATALOG_URL": "postgresql://lgw:hunter2@db:5432/gw", "PATH": "/usr/bin:/bin"}
    shown = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert shown.returncode == 0
    assert "--catalog-url" in shown.stdout and "--store-url" in shown.stdout
    assert "hunter2" not in shown.stdout + shown.stderr


def test_an_unreachable_catalog_is_named_without_its_password(tmp_path, monkeypatch, caplog, postgres_server):
    monkeypatch.setattr(cli, "CATALOG_CONNECT_SECONDS", 0.2)
    closed_port = postgres_server.port + 1 if postgres_server.port < 65535 else postgres_server.port - 1
    url = f"postgresql://lgw:hunter2@127.0.0.1:{closed_port}/gw"
    settings = Settings(state_dir=tmp_path, catalog_url=url)
    with caplog.at_level(logging.DEBUG):
        message = cli.open_catalog(settings, None)
    assert isinstance(message, str) and message.startswith("--catalog-url: cannot reach")
    assert "hunter2" not in message and "hunter2" not in caplog.text
    assert "***" in message


def test_bad_catalog_and_store_urls_are_refused_naming_the_flag(tmp_path):
    assert cli.open_catalog(Settings(state_dir=tmp_path, catalog_url="mysql://u:p@h/db"), None).startswith(
        "--catalog-url"
    )
    try:
        cli.open_store(Settings(state_dir=tmp_path, store_url="ftp://host/x"))
    except ValueError as exc:
        assert "--store-url" in str(exc)
    else:
        raise AssertionError("ftp:// was accepted")


def test_the_default_catalog_is_the_sqlite_file_earlier_releases_used(tmp_path):
    assert Settings(state_dir=tmp_path).catalog_location == f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    store = cli.open_store(Settings(state_dir=tmp_path))
    assert store.root == tmp_path / "adapters" and store.blobs is None
    assert cli.open_store(Settings(state_dir=tmp_path, store_url=str(tmp_path / "elsewhere"))).root == (
        tmp_path / "elsewhere"
    )


def test_lora_modules_take_a_pickled_peft_folder_and_refuse_a_broken_one(tmp_path, demo):
    import shutil

    import torch
    from safetensors.torch import load_file

    from server.gateway import StartupError, prepare

    pickled = tmp_path / "pirate-bin"
    shutil.copytree(demo.adapters["pirate"], pickled)
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    settings = Settings(model=str(demo.base), state_dir=tmp_path / "state", lora_modules={"pirate-bin": str(pickled)})
    prepared = cli.prepare(settings)
    assert prepared.preload == {"pirate-bin": pickled}
    assert not (pickled / "adapter_model.safetensors").exists()  # the source folder is left untouched
    prepared.catalog.close()

    (pickled / "adapter_model.bin").write_bytes(b"not a pickle")
    try:
        prepare(settings)
    except StartupError as exc:
        assert str(exc).startswith("--lora-modules pirate-bin:") and str(tmp_path) not in str(exc)
    else:
        raise AssertionError("a broken .bin was accepted")
