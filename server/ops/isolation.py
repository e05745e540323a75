"""What the gateway's child processes can learn of it: none of its secrets.

The gateway starts children that run code it does not fully control: vLLM's engine core and
workers, fine-tuning workers, merges, and the pickle sandbox. None of them needs the admin key,
the catalog's URL and password, the store's credentials or any other setting, so:

- the gateway is not dumpable: another process of its user can neither read its memory and
  /proc/<pid>/environ (which keeps the environment it started with) nor trace it;
- the values of secret settings given as flags leave its argv (which multiprocessing hands to
  each spawned child) and its process title (/proc/<pid>/cmdline, readable by every local user);
- once the catalog and store are open, the variables that carried secrets leave its environment,
  which every child inherits: LORA_GATEWAY_* (each already read into Settings), AWS_* (boto3's
  client holds its credentials from then on), PGPASSWORD (folded into the catalog URL first) and
  Hugging Face tokens (the gateway downloads nothing).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping

from adapters import confine
from server.config import ENV_PREFIX, Settings

logger = logging.getLogger(__name__)

SECRET_PREFIXES = (ENV_PREFIX, "AWS_")
# What Ray's replicas still need from the environment: the store's client reads its credentials.
STORE_CREDENTIALS = ("AWS_",)
SECRET_NAMES = frozenset({"PGPASSWORD", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"})
# Settings whose values are secrets, besides every SecretStr field: a store URL may name a host
# whose address is not for tenants to learn.
_SECRET_SETTINGS = ("store_url",)
_HIDDEN = "<hidden>"


def is_secret(name: str) -> bool:
    return name.startswith(SECRET_PREFIXES) or name in SECRET_NAMES


def without_secrets(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of `environ` for a child process: the variables that may carry secrets left out."""
    return {name: value for name, value in environ.items() if not is_secret(name)}


def protect_gateway(settings: Settings) -> None:
    """At start: not dumpable, and no secret setting left in argv or the process title."""
    try:
        confine.not_dumpable()
    except confine.ConfinementUnavailable as exc:  # not Linux
        logger.warning("the gateway stays dumpable: %s", exc)
    secrets = secret_values(settings)
    redacted = [_redacted(arg, secrets) for arg in sys.argv]
    if redacted == sys.argv:
        return
    sys.argv[:] = redacted
    sys.orig_argv[:] = [_redacted(arg, secrets) for arg in sys.orig_argv]
    try:
        import setproctitle  # vLLM's dependency too
    except ImportError:
        logger.warning("a secret given as a flag stays in this process's command line; pass it in the environment")
        return
    # Overwrites the memory /proc/<pid>/cmdline (and the startup environ) is read from.
    setproctitle.setproctitle(" ".join(sys.orig_argv))


def withhold_secrets(environ: MutableMapping[str, str] = os.environ, keep: tuple[str, ...] = ()) -> list[str]:
    """Remove the variables that may carry secrets from `environ` (the gateway's own, by default,
    which every child inherits), except those starting with a prefix in `keep`; returns their
    names. Call once the catalog and store are open."""
    names = sorted(name for name in environ if is_secret(name) and not name.startswith(keep))
    for name in names:
        del environ[name]
    if names:
        logger.info("removed %d secret-bearing variables from the environment children inherit", len(names))
    return names


def catalog_password_in_url(settings: Settings, environ: Mapping[str, str] = os.environ) -> Settings:
    """Settings whose catalog URL carries PGPASSWORD, so that reconnections need no environment."""
    password = environ.get("PGPASSWORD")
    if not password or settings.catalog_url is None:
        return settings
    from pydantic import SecretStr
    from sqlalchemy.engine import make_url

    url = make_url(settings.catalog_url.get_secret_value())
    if not url.drivername.startswith("postgresql") or url.password is not None:
        return settings
    with_password = url.set(password=password).render_as_string(hide_password=False)
    return settings.model_copy(update={"catalog_url": SecretStr(with_password)})


def secret_values(settings: Settings) -> list[str]:
    values = []
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        if value is None or not ("SecretStr" in str(field.annotation) or name in _SECRET_SETTINGS):
            continue
        text = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
        if text:
            values.append(text)
    return values


def _redacted(arg: str, secrets: list[str]) -> str:
    """The argument with a secret value hidden: `VALUE`, or `--flag=VALUE` (or an abbreviation)."""
    for secret in secrets:
        if arg == secret:
            return _HIDDEN
        if arg.startswith("--") and arg.endswith("=" + secret):
            return arg[: -len(secret)] + _HIDDEN
    return arg
