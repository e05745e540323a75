"""The `lora-gateway` command: `serve` and `demo-model`."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from server.config import ENV_PREFIX, Settings
from server.logs import configure_logging

logger = logging.getLogger("lora_gateway")

_FLAG_TYPES = {"int": int, "float": float}
ENGINE_DIED_EXIT = 3


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; its help names the environment variable and default."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = ENV_PREFIX + name.upper()
        default = field.get_default(call_default_factory=True)
        shown = " ".join(f"{k}={v}" for k, v in default.items()) if isinstance(default, dict) else default
        help_text = f"{field.description} [env {env}; default: {shown if shown not in (None, '') else 'none'}]"
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS, "dest": name}
        annotation = getattr(field.annotation, "__name__", "")
        if name == "lora_modules":
            kwargs.update(nargs="+", metavar="NAME=PATH")
        elif annotation in _FLAG_TYPES:
            kwargs.update(type=_FLAG_TYPES[annotation], metavar=annotation.upper())
        else:
            kwargs.update(metavar="VALUE")
        parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-gateway",
        description="A multi-tenant LoRA inference server: one vLLM engine, many adapters, the OpenAI API.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve the OpenAI API (with no --model: the embedded demo)",
        description="Serve the OpenAI API over one base model and its LoRA adapters. Flags override "
        "the environment variables named in each flag's help.",
    )
    _add_settings_flags(serve)
    demo = commands.add_parser(
        "demo-model",
        help="build the embedded demo model and adapters into a folder",
        description="Build a tiny base model with its tokenizer and chat template, and two LoRA "
        "adapters in PEFT format, offline, in seconds.",
    )
    demo.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to create")
    return parser


def _fail(message: str) -> int:
    print(f"lora-gateway: error: {message}", file=sys.stderr)
    return 2


def _settings_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        flag = "--" + "-".join(str(part) for part in error["loc"][:1]).replace("_", "-")
        problems.append(f"{flag}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    configure_logging("info", "text")
    if command == "demo-model":
        from server.demo import build_demo

        demo = build_demo(args["out"], progress=lambda line: print(line, file=sys.stderr))
        print(f"demo model in {demo.root}: base model {demo.base}, adapters {', '.join(sorted(demo.adapters))}")
        return 0
    try:
        settings = Settings(**args)
    except ValidationError as exc:
        return _fail(_settings_error(exc))
    return serve(settings)


def serve(settings: Settings) -> int:
    """Check everything that can fail fast, start the engine, then serve until stopped."""
    from adapters.base_model import BaseModelInfo, fingerprint
    from adapters.database import BaseIdentity
    from adapters.errors import AdapterError
    from adapters.registry import AdapterRules, Registry
    from adapters.validate import check_name, validate_adapter
    from adapters.zero import ZERO_ADAPTER_NAME, write_zero_adapter

    configure_logging(settings.log_level, settings.log_format)
    model_path = settings.model
    lora_modules = dict(settings.lora_modules)
    if model_path is None:
        from server.demo import ensure_demo

        demo = ensure_demo(settings.demo_dir, progress=lambda line: logger.info("demo: %s", line))
        model_path = str(demo.base)
        if settings.dtype == "auto":
            # vLLM's auto would downcast the demo's float32 to bfloat16; PEFT parity is in float32.
            settings = settings.model_copy(update={"dtype": "float32"})
        if not lora_modules:
            lora_modules = {name: str(path) for name, path in demo.adapters.items()}
    if not (Path(model_path) / "config.json").is_file():
        return _fail(f"--model: {model_path} is not a model folder with a config.json (nothing is downloaded)")
    try:
        base = BaseModelInfo.from_model_dir(Path(model_path))
    except (KeyError, ValueError) as exc:
        return _fail(f"--model: the model's config.json lacks {exc}; Llama- and Qwen2-family models are supported")

    rules = AdapterRules(base, settings.max_lora_rank, settings.max_adapter_bytes)
    preload = {}
    for name, path in lora_modules.items():
        try:
            check_name(name, "--lora-modules")
            rules.validate(Path(path))
        except AdapterError as exc:
            return _fail(f"--lora-modules {name}: {exc.message}")
        preload[name] = Path(path)
    if settings.adapter_dir is not None and not settings.adapter_dir.is_dir():
        return _fail(f"--adapter-dir: {settings.adapter_dir} is not a folder")
    if len(preload) > settings.max_cpu_loras:
        return _fail(f"--lora-modules names {len(preload)} adapters; --max-cpu-loras allows {settings.max_cpu_loras}")

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        store = open_store(settings)
    except ValueError as exc:
        return _fail(str(exc))
    except ModuleNotFoundError:
        return _fail("--store-url: s3:// needs boto3; install lora-gateway[s3]")
    identity = BaseIdentity(settings.base_name, fingerprint(Path(model_path)))
    catalog_or_error = open_catalog(settings, identity)
    if isinstance(catalog_or_error, str):
        return _fail(catalog_or_error)
    catalog = catalog_or_error

    from server.app import build_app
    from server.engine.vllm_engine import VllmEngine
    from server.metrics import GatewayMetrics
    from server.serving import bind_listener, serve_app

    try:
        listener = bind_listener(settings.host, settings.port)
    except OSError as exc:
        return _fail(f"--host/--port: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}")

    engine_died: list[bool] = []
    work_dir = Path(tempfile.mkdtemp(prefix="lora-gateway-"))
    try:
        zero_spec = None
        if settings.base_uses_zero_adapter:
            zero_path = write_zero_adapter(base, work_dir / ZERO_ADAPTER_NAME, model_path)
            zero_spec = validate_adapter(zero_path, base, max_rank=settings.max_lora_rank)
        engine = VllmEngine.start(settings, model_path)
        metrics = GatewayMetrics(settings.base_name, settings.metrics_adapter_labels)
        registry = Registry(
            engine,
            base_name=settings.base_name,
            base_adapter=zero_spec,
            max_resident=settings.max_cpu_loras,
            catalog=catalog,
            store=store,
            rules=rules,
            events=metrics.events,
        )
        app = build_app(settings, engine, registry, preload, metrics)

        def on_engine_death() -> None:
            # Drain and exit non-zero, so that the orchestrator starts a fresh engine.
            engine_died.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

        app.state.on_engine_death = on_engine_death
        serve_app(app, settings, listener)
    finally:
        listener.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    if engine_died:
        logger.error("exiting with status %d: the inference engine died", ENGINE_DIED_EXIT)
        return ENGINE_DIED_EXIT
    return 0


CATALOG_CONNECT_SECONDS = 30.0


def open_store(settings: Settings):
    """The adapter store: a local folder, or a local cache in front of a shared folder or bucket."""
    from adapters.blobs import open_blobs
    from adapters.store import AdapterStore

    url = settings.store_url
    if url and "://" not in url:
        return AdapterStore(Path(url), max_bytes=settings.max_adapter_bytes)
    return AdapterStore(settings.state_dir / "adapters", blobs=open_blobs(url), max_bytes=settings.max_adapter_bytes)


def open_catalog(settings: Settings, identity):
    """The catalog, migrated; a message naming --catalog-url when it cannot be opened.

    A database still starting (a pod beside its PostgreSQL) gets CATALOG_CONNECT_SECONDS.
    """
    from adapters.database import Database, safe_url
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
