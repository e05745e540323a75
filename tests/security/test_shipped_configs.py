"""Shipped setups ask for a key: compose, the image, Kubernetes, Ray Serve and the README's
examples, checked statically (there is no Docker engine or cluster here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from server.config import ENV_PREFIX, Settings
from server.gateway import StartupError, check_open_mode
from tests.test_packaging import gateway_container, k8s_resources, target_env

ROOT = Path(__file__).resolve().parents[2]
ADMIN = f"{ENV_PREFIX}ADMIN_KEY"
METRICS = f"{ENV_PREFIX}METRICS_KEY"
KEYS = {ADMIN: "a" * 43, METRICS: "m" * 43}
COMPOSE_FILES = [ROOT / "docker-compose.yml", ROOT / "deploy/compose/shared-state.yml"]
PROMETHEUS_CONFIGS = [ROOT / "deploy/prometheus/prometheus.yml", ROOT / "deploy/compose/prometheus.yml"]
SECRETS_DIR = "/run/secrets/"


class MissingVariable(Exception):
    """What compose reports, and stops on, for ${VAR:?message} with VAR unset or empty."""


_VARIABLE = re.compile(r"\$\$|\$\{(?P<braced>[^}]*)\}|\$(?P<plain>[A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error} and ${VAR?error}."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match[0] == "$$":
            return "$"
        if match["plain"]:
            return env.get(match["plain"], "")
        name, operator, rest = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?]|)(.*)", match["braced"], re.S).groups()
        current = env.get(name)
        unset = current is None or (operator.startswith(":") and current == "")
        if operator.endswith("?") and unset:
            raise MissingVariable(f"{name}: {rest}")
        if operator.endswith("-") and unset:
            return rest
        return current or ""

    return _VARIABLE.sub(one, value)


def compose_file(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compose_stops_with_a_message_naming_each_unset_key(path):
    document = compose_file(path)
    for missing in (ADMIN, METRICS):
        with pytest.raises(MissingVariable, match=missing) as stopped:
            interpolate(document, {k: v for k, v in KEYS.items() if k != missing})
        assert "32" in str(stopped.value)  # says what a good key is
        with pytest.raises(MissingVariable, match=missing):
            interpolate(document, {**KEYS, missing: ""})  # set but empty is unset too
    services = interpolate(document, KEYS)["services"]
    gateways = [name for name in services if name.startswith("gateway")]
    assert gateways
    for name in gateways:
        environment = services[name].get("environment", {})
        if name == "gateway" and path.name != "docker-compose.yml":
            continue  # an override: docker-compose.yml's gateway has the keys
        assert environment[ADMIN] == KEYS[ADMIN] and environment[METRICS] == KEYS[METRICS], name
        for key, value in KEYS.items():  # and each value is one the gateway accepts
            Settings(**{key.removeprefix(ENV_PREFIX).lower(): value})


def test_compose_never_serves_open():
    text = "\n".join(path.read_text() for path in [*COMPOSE_FILES, ROOT / "Dockerfile"])
    assert f"{ENV_PREFIX}ALLOW_OPEN" not in text
    assert not re.search(rf"{ADMIN}:\s*\$\{{{ADMIN}:-", text), "a default would let the key be empty"


@pytest.mark.parametrize("config_path", PROMETHEUS_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_prometheus_sends_the_metrics_key_compose_gives_it(config_path):
    base = compose_file(ROOT / "docker-compose.yml")
    (job,) = yaml.safe_load(config_path.read_text())["scrape_configs"]
    authorization = job["authorization"]
    assert authorization.get("type", "Bearer") == "Bearer"
    secret_file = authorization["credentials_file"]
    assert secret_file.startswith(SECRETS_DIR)
    secret_name = secret_file.removeprefix(SECRETS_DIR)
    # Compose mounts the secret in the Prometheus service, filled from the very variable the gateway reads.
    prometheus = base["services"]["prometheus"]
    assert secret_name in [s if isinstance(s, str) else s["source"] for s in prometheus["secrets"]]
    assert base["secrets"][secret_name] == {"environment": METRICS}
    assert base["services"]["gateway"]["environment"][METRICS].startswith(f"${{{METRICS}:?")


def test_the_image_alone_refuses_to_serve_without_a_key():
    """The Dockerfile listens on 0.0.0.0 and sets no key: `serve` must refuse, not run open."""
    for target in ("cpu", "gpu"):
        env = target_env(target)
        assert ADMIN not in env and f"{ENV_PREFIX}ALLOW_OPEN" not in env
        host = env[f"{ENV_PREFIX}HOST"]
        with pytest.raises(StartupError, match="--admin-key"):
            check_open_mode(Settings(host=host), host)
        check_open_mode(Settings(host=host, admin_key=KEYS[ADMIN]), host)


def _secret_refs(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        env["name"]: env["valueFrom"]["secretKeyRef"]
        for env in container.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    }


def test_kubernetes_takes_both_keys_from_the_secret_and_prometheus_sends_one():
    resources = k8s_resources()
    secret = resources["Secret"]
    refs = _secret_refs(gateway_container())
    for variable, key in ((ADMIN, "admin-key"), (METRICS, "metrics-key")):
        assert refs[variable] == {"name": secret["metadata"]["name"], "key": key, "optional": False}
        # The example's placeholder is refused, so a Secret applied unedited never starts a gateway.
        placeholder = secret["stringData"][key]
        with pytest.raises(ValidationError):
            Settings(**{variable.removeprefix(ENV_PREFIX).lower(): placeholder})
    (endpoint,) = resources["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["authorization"]["type"] == "Bearer"
    assert endpoint["authorization"]["credentials"] == {"name": secret["metadata"]["name"], "key": "metrics-key"}
    assert f"{ENV_PREFIX}ADMIN_KEY" not in str(resources["ConfigMap"]["data"])


def _ray_documents() -> tuple[dict[str, Any], dict[str, Any]]:
    service = yaml.safe_load((ROOT / "deploy/ray/rayservice.yaml").read_text())
    config = yaml.safe_load((ROOT / "deploy/ray/serve-config.yaml").read_text())
    return service, config


def test_ray_examples_pass_the_keys_from_a_secret_never_in_the_file():
    service, config = _ray_documents()
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"], *(group["template"] for group in cluster["workerGroupSpecs"])]
    secret = k8s_resources()["Secret"]["metadata"]["name"]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            refs = _secret_refs(container)
            assert refs[ADMIN] == {"name": secret, "key": "admin-key", "optional": False}, container["name"]
            assert refs[METRICS] == {"name": secret, "key": "metrics-key", "optional": False}, container["name"]
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    for document in (embedded, config):
        (application,) = document["applications"]
        assert not {"admin_key", "metrics_key", "allow_open"} & set(application["args"])
        assert document["http_options"]["host"] == "0.0.0.0"  # hence the key


def _shell_commands(markdown: str) -> list[str]:
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", markdown, re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.split("#", 1)[0].strip() for line in joined.splitlines() if line.strip()]
    return commands


def test_the_readme_runs_the_image_with_a_key():
    commands = _shell_commands((ROOT / "README.md").read_text())
    runs = [c for c in commands if c.startswith("docker run")]
    serving = [c for c in runs if "new-key" not in c]  # `docker run ... new-key` prints a key
    assert serving, "the README has no `docker run` of the gateway"
    for command in serving:
        words = shlex.split(command)
        passed = {words[i + 1].split("=", 1)[0] for i, word in enumerate(words[:-1]) if word in ("-e", "--env")}
        assert ADMIN in passed or "--env-file" in words, command
    assert any(f"{ADMIN}=$(docker run --rm lora-gateway:cpu new-key)" in c for c in commands)
