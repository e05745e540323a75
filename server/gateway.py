"""Putting a gateway together from its settings: the model, the adapter rules, the catalog and the
store, then the registry and the app around an engine.

`lora-gateway serve` does this around the in-process vLLM engine; the Ray Serve ingress
(`server/ray_app.py`) does the same around the engine replicas.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

from adapters.base_model import BaseModelInfo, fingerprint
from adapters.database import BaseIdentity, Database
from adapters.errors import AdapterError
from adapters.registry import AdapterRules, Registry
from adapters.spec import AdapterSpec
from adapters.store import AdapterStore, open_adapter_store
from adapters.validate import check_name
from adapters.work import WorkPool
from server.config import Settings
from server.http.open_mode import is_loopback

logger = logging.getLogger("lora_gateway")

CATALOG_CONNECT_SECONDS = 30.0


class StartupError(Exception):
    """A setting that cannot work; the message names the flag."""


@dataclass
class Prepared:
    """Everything a gateway needs before its engine: checked, opened, ready to assemble."""

    settings: Settings
    model_path: str
    base: BaseModelInfo
    rules: AdapterRules
    store: AdapterStore
    catalog: Database
    preload: dict[str, Path] = field(default_factory=dict)


def check_open_mode(settings: Settings, host: str | None) -> None:
    """Refuse to run open (no --admin-key) where other machines could reach it; raises StartupError.

    `host` is where the server listens; None when the settings do not say (a Ray Serve config's
    http_options decide), which counts as reachable. Call it first: it needs nothing built.
    """
    if settings.admin_key is not None:
        return
    if settings.metrics_key is not None:
        raise StartupError("--metrics-key needs --admin-key: without an admin key every caller is the admin")
    if settings.allow_open or (host is not None and is_loopback(host)):
        return
    where = f"--host {host} is reachable from other machines" if host is not None else "Ray Serve decides the address"
    raise StartupError(
        f"{where} and no --admin-key is set, so every caller would be the admin. Set --admin-key "
        "(LORA_GATEWAY_ADMIN_KEY; `lora-gateway new-key` prints one), listen on 127.0.0.1, or pass "
        "--allow-open to serve open on purpose"
    )


def check_catalog_not_open(settings: Settings, catalog: Database) -> None:
    """A catalog that holds tenants or keys is never served open: their keys would mean nothing."""
    if settings.admin_key is not None:
        return
    tenants, keys = len(catalog.tenants()), len(catalog.keys())
    if tenants or keys:
        raise StartupError(
            f"--admin-key: the catalog holds {tenants} tenant(s) and {keys} key(s); without --admin-key every "
            "caller would be the admin and could use and change them all. Start with the admin key "
            "(LORA_GATEWAY_ADMIN_KEY)"
        )


def with_demo(settings: Settings) -> Settings:
    """With no --model: the embedded demo (built once), its adapters, float32 for parity, and its
    tool-call parser (hermes) unless another is given."""
    if settings.model is not None:
        return settings
    from adapters.demo import ensure_demo

    demo = ensure_demo(settings.demo_dir, progress=lambda line: logger.info("demo: %s", line))
    update: dict = {"model": str(demo.base), "served_model_name": settings.served_model_name or "demo"}
    if settings.dtype == "auto":
        # vLLM's auto would downcast the demo's float32 to bfloat16; PEFT parity is in float32.
        update["dtype"] = "float32"
    if not settings.lora_modules:
        update["lora_modules"] = {name: str(path) for name, path in demo.adapters.items()}
    if settings.tool_call_parser is None:
        # The demo's template writes calls in Hermes' format, so tool_choice "auto" works out of the box.
        update |= {"tool_call_parser": "hermes", "enable_auto_tool_choice": True}
    return settings.model_copy(update=update)


def prepare(settings: Settings) -> Prepared:
    """Check everything that can fail fast and open the catalog and store; raises StartupError."""
    assert settings.model is not None, "call with_demo first"
    model_path = settings.model
    if not (Path(model_path) / "config.json").is_file():
        raise StartupError(f"--model: {model_path} is not a model folder with a config.json (nothing is downloaded)")
    try:
        base = BaseModelInfo.from_model_dir(Path(model_path))
    except (KeyError, ValueError) as exc:
        raise StartupError(
            f"--model: the model's config.json lacks {exc}; Llama- and Qwen2-family models are supported"
        ) from None
    if settings.tool_call_parser is not None:
        from server.engine.tool_parsers import check_parser_name

        try:
            check_parser_name(settings.tool_call_parser)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
    rules = AdapterRules(base, settings.max_lora_rank, settings.max_adapter_bytes)
    preload = {}
    for name, path in settings.lora_modules.items():
        try:
            check_name(name, "--lora-modules")
            _check_preload(Path(path), rules)
        except AdapterError as exc:
            raise StartupError(f"--lora-modules {name}: {exc.message}") from None
        preload[name] = Path(path)
    if settings.adapter_dir is not None and not settings.adapter_dir.is_dir():
        raise StartupError(f"--adapter-dir: {settings.adapter_dir} is not a folder")
    if len(preload) > settings.max_cpu_loras:
        raise StartupError(
            f"--lora-modules names {len(preload)} adapters; --max-cpu-loras allows {settings.max_cpu_loras}"
        )
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        store = open_store(settings)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    except ModuleNotFoundError:
        raise StartupError("--store-url: s3:// needs boto3; install lora-gateway[s3]") from None
    catalog = open_catalog(settings, BaseIdentity(settings.base_name, fingerprint(Path(model_path))))
    if isinstance(catalog, str):
        raise StartupError(catalog)
    try:
        check_catalog_not_open(settings, catalog)
    except StartupError:
        catalog.close()
        raise
    return Prepared(settings, model_path, base, rules, store, catalog, preload)


def _check_preload(folder: Path, rules: AdapterRules) -> None:
    """Validate a --lora-modules folder as registration will: staged, converted, then checked."""
    import tempfile

    from adapters.convert import convert_staged
    from adapters.store import copy_folder

    with tempfile.TemporaryDirectory(prefix="lora-gateway-check-") as scratch:
        staging = Path(scratch) / "adapter"
        staging.mkdir()
        copy_folder(folder, staging, rules.max_bytes)
        convert_staged(staging)
        rules.validate(staging)


def assemble(prepared: Prepared, engine, zero_spec: AdapterSpec | None = None, metrics=None) -> FastAPI:
    """The registry and the app around a started engine."""
    from server.app import build_app
    from server.ops.metrics import GatewayMetrics

    settings = prepared.settings
    metrics = metrics or GatewayMetrics(settings.base_name, settings.metrics_adapter_labels)
    registry = Registry(
        engine,
        base_name=settings.base_name,
        base_adapter=zero_spec,
        max_resident=settings.max_cpu_loras,
        catalog=prepared.catalog,
        store=prepared.store,
        rules=prepared.rules,
        events=metrics.events,
        work=WorkPool(settings.adapter_work_threads),
    )
    return build_app(settings, engine, registry, prepared.preload, metrics)


def open_store(settings: Settings) -> AdapterStore:
    """The adapter store: a local folder, or a local cache in front of a shared folder or bucket."""
    return open_adapter_store(settings.store_url, settings.state_dir / "adapters", settings.max_adapter_bytes)


def open_catalog(settings: Settings, identity: BaseIdentity | None) -> Database | str:
    """The catalog, migrated; a message naming --catalog-url when it cannot be opened.

    A database still starting (a pod beside its PostgreSQL) gets CATALOG_CONNECT_SECONDS.
    """
    from adapters.database import safe_url
    from adapters.errors import CatalogUnavailable

    location = settings.catalog_location
    deadline = time.monotonic() + CATALOG_CONNECT_SECONDS
    while True:
        try:
            return Database(location, identity)
        except ValueError as exc:
            return str(exc)
        except ModuleNotFoundError:
            return "--catalog-url: postgresql:// needs psycopg; install lora-gateway[postgres]"
        except CatalogUnavailable:
            if time.monotonic() > deadline:
                return f"--catalog-url: cannot reach the catalog database at {safe_url(location)}"
            logger.warning("waiting for the catalog database at %s", safe_url(location))
            time.sleep(2)
