"""The `lora-gateway` command: `serve`, `demo-model` and `new-key` (`merge` and `convert` have modules of their own)."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from server.commands.convert import add_convert_parser, run_convert
from server.commands.merge import add_merge_parser, run_merge
from server.config import ENV_PREFIX, Settings
from server.ops.logs import configure_logging

logger = logging.getLogger("lora_gateway")

_FLAG_TYPES = {"int": int, "float": float}
ENGINE_DIED_EXIT = 3


def _flag_type_name(annotation: Any) -> str:
    """The name of a field's type, `int` for `int | None` too (None: the flag left out)."""
    given = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if len(given) == 1 and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = given[0]
    return getattr(annotation, "__name__", "")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; its help names the environment variable and default."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = ENV_PREFIX + name.upper()
        default = field.get_default(call_default_factory=True)
        shown = " ".join(f"{k}={v}" for k, v in default.items()) if isinstance(default, dict) else default
        help_text = f"{field.description} [env {env}; default: {shown if shown not in (None, '') else 'none'}]"
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS, "dest": name}
        annotation = _flag_type_name(field.annotation)
        if name == "lora_modules":
            kwargs.update(nargs="+", metavar="NAME=PATH")
        elif annotation == "bool":
            kwargs.update(action="store_const", const=True)
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
    commands.add_parser(
        "new-key",
        help="print a new random key for --admin-key or --metrics-key",
        description="Print a new random key (256 bits, URL-safe base64) for --admin-key or --metrics-key. "
        "Pass it in the environment (LORA_GATEWAY_ADMIN_KEY), not as a flag, which shows in `ps`.",
    )
    add_merge_parser(commands)
    add_convert_parser(commands)
    return parser


def _fail(message: str) -> int:
    print(f"lora-gateway: error: {message}", file=sys.stderr)
    return 2


def _settings_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        flag = "--" + "-".join(str(part) for part in error["loc"][:1]).replace("_", "-")
        message = error["msg"].removeprefix("Value error, ")
        problems.append(message if message.startswith(flag + " ") else f"{flag}: {message}")
    return "; ".join(problems)


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    configure_logging("info", "text")
    if command == "merge":
        return run_merge(args)
    if command == "convert":
        return run_convert(args)
    if command == "new-key":
        print(new_key())
        return 0
    if command == "demo-model":
        from adapters.demo import build_demo

        demo = build_demo(args["out"], progress=lambda line: print(line, file=sys.stderr))
        print(f"demo model in {demo.root}: base model {demo.base}, adapters {', '.join(sorted(demo.adapters))}")
        return 0
    try:
        settings = Settings(**args)
    except ValidationError as exc:
        return _fail(_settings_error(exc))
    return serve(settings)


def _served(code: int) -> typing.NoReturn:
    """Once the gateway has served: exit at once, without the interpreter's teardown."""
    from server.engine.lifeline import exit_now

    exit_now(code)


def new_key() -> str:
    """A random key for --admin-key or --metrics-key: 32 bytes, 43 URL-safe characters."""
    return secrets.token_urlsafe(32)


def serve(settings: Settings) -> int:
    """Check everything that can fail fast, start the engine, then serve until stopped."""
    from adapters.sandbox import loader_problem
    from adapters.validate import validate_adapter
    from adapters.zero import ZERO_ADAPTER_NAME, write_zero_adapter
    from server.gateway import StartupError, assemble, check_open_mode, prepare, with_demo
    from server.ops.isolation import catalog_password_in_url, protect_gateway, withhold_secrets

    configure_logging(settings.log_level, settings.log_format)
    protect_gateway(settings)
    try:
        check_open_mode(settings, settings.host)  # before the demo is built: refuse in a second
    except StartupError as exc:
        return _fail(str(exc))
    if (problem := loader_problem()) is not None:
        logger.warning("pickled adapters (adapter_model.bin, MiniMind .pth) will be refused: %s", problem)
    settings = with_demo(settings)
    if settings.ray:
        from server.ray_app import serve_on_ray

        code = serve_on_ray(catalog_password_in_url(settings))  # PGPASSWORD leaves the environment
        if code == 0:  # it served (the checks before Ray starts return 2)
            _served(code)
        return code
    try:
        prepared = prepare(catalog_password_in_url(settings))
    except StartupError as exc:
        return _fail(str(exc))
    withhold_secrets()  # the catalog and store are open: no child needs them from here on

    from server.commands.serving import bind_listener, serve_app

    try:
        listener = bind_listener(settings.host, settings.port)
    except OSError as exc:
        return _fail(f"--host/--port: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}")

    engine_died: list[bool] = []
    work_dir = Path(tempfile.mkdtemp(prefix="lora-gateway-"))
    try:
        # Imported once the port is ours: vllm takes seconds to import, a port in use fails at once.
        from server.engine.vllm_engine import VllmEngine

        zero_spec = None
        if settings.base_uses_zero_adapter:
            zero_path = write_zero_adapter(prepared.base, work_dir / ZERO_ADAPTER_NAME, prepared.model_path)
            zero_spec = validate_adapter(zero_path, prepared.base, max_rank=settings.max_lora_rank)
        engine = VllmEngine.start(settings, prepared.model_path)
        app = assemble(prepared, engine, zero_spec)

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
        _served(ENGINE_DIED_EXIT)
    _served(0)
