"""server/ops/isolation.py: what the gateway keeps from its children."""

from __future__ import annotations

import sys

import pytest
from sqlalchemy.engine import make_url

from server.config import Settings
from server.ops.isolation import catalog_password_in_url, protect_gateway, withhold_secrets, without_secrets


@pytest.fixture
def quiet_process(monkeypatch):
    """This test process stays dumpable and keeps its title."""
    monkeypatch.setattr("adapters.confine.not_dumpable", lambda: None)
    monkeypatch.setitem(sys.modules, "setproctitle", None)


def test_secret_flag_values_leave_argv_in_each_form(monkeypatch, quiet_process):
    argv = [
        "lora-gateway",
        "serve",
        "--admin-key",
        "k3y-value-long-enough-for-an-admin-key",
        "--catalog-url=sqlite:///x.db",
        "--adm=k3y-value-long-enough-for-an-admin-key",
    ]
    monkeypatch.setattr(sys, "argv", list(argv))
    monkeypatch.setattr(sys, "orig_argv", ["python", *argv])
    protect_gateway(Settings(admin_key="k3y-value-long-enough-for-an-admin-key", catalog_url="sqlite:///x.db"))
    hidden = ["lora-gateway", "serve", "--admin-key", "<hidden>", "--catalog-url=<hidden>", "--adm=<hidden>"]
    assert sys.argv == hidden and sys.orig_argv == ["python", *hidden]


def test_an_argument_that_only_contains_a_short_secret_is_left_alone(monkeypatch, quiet_process):
    argv = ["lora-gateway", "serve", "--store-url", "st", "--state-dir", "/state"]
    monkeypatch.setattr(sys, "argv", list(argv))
    protect_gateway(Settings(store_url="st"))
    assert sys.argv == ["lora-gateway", "serve", "--store-url", "<hidden>", "--state-dir", "/state"]


def test_the_variables_that_may_carry_secrets_leave_the_environment():
    environ = {
        "LORA_GATEWAY_ADMIN_KEY": "k",
        "LORA_GATEWAY_HOST": "0.0.0.0",
        "AWS_SECRET_ACCESS_KEY": "s",
        "PGPASSWORD": "p",
        "HF_TOKEN": "t",
        "PATH": "/bin",
        "HOME": "/home/gateway",
    }
    assert without_secrets(environ) == {"PATH": "/bin", "HOME": "/home/gateway"}
    removed = withhold_secrets(environ)
    assert removed == ["AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "LORA_GATEWAY_ADMIN_KEY", "LORA_GATEWAY_HOST", "PGPASSWORD"]
    assert environ == {"PATH": "/bin", "HOME": "/home/gateway"}


@pytest.mark.parametrize(
    ("url", "password"),
    [
        ("postgresql://lgw@db:5432/gateway", "p@ss:w/rd"),
        ("postgresql+psycopg://lgw:own@db/gateway", "own"),  # the URL's own password wins
        ("sqlite:///catalog.sqlite3", None),
    ],
)
def test_pgpassword_moves_into_the_catalog_url(url, password):
    settings = catalog_password_in_url(Settings(catalog_url=url), {"PGPASSWORD": "p@ss:w/rd"})
    moved = make_url(settings.catalog_url.get_secret_value())
    assert moved.password == password
    parts = ("drivername", "username", "host", "port", "database")
    assert [getattr(moved, part) for part in parts] == [getattr(make_url(url), part) for part in parts]
    assert catalog_password_in_url(Settings(catalog_url=url), {}).catalog_url.get_secret_value() == url
