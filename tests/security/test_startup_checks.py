"""What `lora-gateway serve` refuses at start: open mode off loopback, a catalog with tenants or
keys served open, and weak keys; and `lora-gateway new-key`, which prints a strong one."""

from __future__ import annotations

import os
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from adapters.database import Database
from server.commands.cli import main
from server.config import Settings
from server.gateway import StartupError, check_open_mode, prepare

ROOT = Path(__file__).resolve().parents[2]
KEY = "k" * 32


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gateway.example", ""])
def test_open_mode_is_refused_off_loopback_naming_the_flag(host, tmp_path, capsys):
    # A --model that does not exist: were the check missing, serve would stop there instead.
    args = ["serve", "--host", host, "--model", str(tmp_path / "no-model"), "--state-dir", str(tmp_path / "state")]
    assert main(args) == 2
    message = capsys.readouterr().err
    assert "--admin-key" in message and "--allow-open" in message and "lora-gateway new-key" in message
    assert "--model" not in message  # refused first, before anything is looked at


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "localhost", "::1", "[::1]"])
def test_open_mode_stays_on_loopback_and_elsewhere_needs_allow_open(host):
    check_open_mode(Settings(host=host), host)  # make serve: the demo, open, on loopback
    check_open_mode(Settings(host="0.0.0.0", allow_open=True), "0.0.0.0")
    check_open_mode(Settings(host="0.0.0.0", admin_key=KEY), "0.0.0.0")
    with pytest.raises(StartupError, match="--admin-key"):
        check_open_mode(Settings(host="0.0.0.0"), "0.0.0.0")
    with pytest.raises(StartupError, match="--admin-key"):
        check_open_mode(Settings(), None)  # a Ray Serve config: Serve, not the settings, says where


def test_serve_on_every_interface_without_a_key_exits_at_once(tmp_path):
    """The image's own command: `lora-gateway serve` with LORA_GATEWAY_HOST=0.0.0.0 and no key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_GATEWAY_")}
    env |= {
        "LORA_GATEWAY_HOST": "0.0.0.0",
        "LORA_GATEWAY_STATE_DIR": str(tmp_path / "state"),
        "LORA_GATEWAY_DEMO_DIR": str(tmp_path / "demo"),
    }
    started = time.monotonic()
    # Its port is taken: were the check missing, serve would stop there rather than start an engine.
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        env["LORA_GATEWAY_PORT"] = str(taken.getsockname()[1])
        result = subprocess.run(
            [sys.executable, "-m", "server", "serve"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
        )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--admin-key" in result.stderr and "0.0.0.0" in result.stderr
    assert not (tmp_path / "demo").exists()
    assert time.monotonic() - started < 60


def test_ray_serve_configs_need_a_key(monkeypatch, demo):
    from server.ray_app import app_builder

    monkeypatch.delenv("LORA_GATEWAY_ADMIN_KEY", raising=False)
    with pytest.raises(RuntimeError, match="--admin-key"):
        app_builder({"model": str(demo.base)})


def _catalog_with(state: Path, *, tenant: bool, key: bool) -> None:
    from server.http.auth import KeyRing

    catalog = Database(state / "catalog.sqlite3")
    try:
        if tenant:
            _, row = KeyRing.mint("acme")
            catalog.add_tenant("acme", {}, first_key=row if key else None)
    finally:
        catalog.close()


@pytest.mark.parametrize("key", [True, False], ids=["tenant-and-key", "tenant"])
def test_a_catalog_with_tenants_is_never_served_open(key, tmp_path, demo):
    state = tmp_path / "state"
    state.mkdir()
    _catalog_with(state, tenant=True, key=key)
    for settings in (
        Settings(model=str(demo.base), state_dir=state),
        Settings(model=str(demo.base), state_dir=state, host="0.0.0.0", allow_open=True),
    ):
        with pytest.raises(StartupError, match="--admin-key") as refused:
            prepare(settings)
        assert "tenant" in str(refused.value)
    # With the key it starts, on the same catalog.
    prepare(Settings(model=str(demo.base), state_dir=state, admin_key=KEY)).catalog.close()
    # An empty catalog still serves open on loopback (make serve).
    empty = tmp_path / "empty"
    empty.mkdir()
    _catalog_with(empty, tenant=False, key=False)
    prepare(Settings(model=str(demo.base), state_dir=empty)).catalog.close()


@pytest.mark.parametrize("flag", ["--admin-key", "--metrics-key"])
def test_a_short_or_malformed_key_is_refused_at_start_naming_the_flag(flag, tmp_path, capsys, monkeypatch):
    base = ["serve", "--model", str(tmp_path / "no-model"), "--state-dir", str(tmp_path / "state")]
    for weak in ("change-me", "x" * 31, "a-key-of-thirty-two-characters-but\n", "with spaces " * 3):
        extra = ["--admin-key", KEY] if flag == "--metrics-key" else []
        assert main([*base, *extra, flag, weak]) == 2
        message = capsys.readouterr().err
        assert flag in message and (str(32) in message or "spaces" in message)
        assert weak.strip() not in message  # a refused key is not echoed
    # The environment variable is held to the same rule.
    monkeypatch.setenv("LORA_GATEWAY_" + flag[2:].upper().replace("-", "_"), "change-me")
    assert main([*base, *(["--admin-key", KEY] if flag == "--metrics-key" else [])]) == 2
    assert flag in capsys.readouterr().err


def test_a_metrics_key_needs_an_admin_key():
    with pytest.raises(StartupError, match="--metrics-key needs --admin-key"):
        check_open_mode(Settings(metrics_key=KEY), "127.0.0.1")


def test_new_key_prints_a_fresh_strong_key(capsys):
    keys = []
    for _ in range(2):
        assert main(["new-key"]) == 0
        keys.append(capsys.readouterr().out.strip())
    assert keys[0] != keys[1]
    for key in keys:
        assert len(key) >= 43 and set(key) <= set(string.ascii_letters + string.digits + "-_")
        assert Settings(admin_key=key, metrics_key=key).admin_key.get_secret_value() == key


def test_weak_keys_fail_settings_validation_without_showing_them():
    with pytest.raises(ValidationError) as refused:
        Settings(admin_key="hunter2-hunter2")
    assert "hunter2" not in str(refused.value)


def test_every_setting_has_a_help_line_the_new_ones_included():
    from server.commands.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    helps = {action.dest: action.help or "" for action in serve._actions}
    for name, field in Settings.model_fields.items():
        assert field.description and len(field.description.split()) >= 4, f"--{name} explains nothing"
        assert helps[name].startswith(field.description), name
    for flag in ("allow_open", "metrics_key", "admin_key"):
        assert "32" in helps[flag] or "loopback" in helps[flag] or "trust" in helps[flag]
    shown = serve.format_help()
    assert "--allow-open" in shown and "--metrics-key" in shown and "new-key" in shown
