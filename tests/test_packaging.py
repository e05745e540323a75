"""The Dockerfile, .dockerignore, docker-compose.yml and deploy/, checked without Docker or a cluster."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.config import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
STATE_DIR = "/var/lib/lora-gateway"
PORT = 8000

# Settings that another change is adding to server.config; drop a name once it is a field there.
PENDING_SETTINGS: set[str] = set()

YAML_FILES = sorted({*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml"), COMPOSE})
JSON_FILES = sorted(DEPLOY.rglob("*.json"))


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------- parsing


@dataclass
class Stage:
    """One FROM section of the Dockerfile."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


@cache
def dockerfile_stages() -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    for keyword, args in _dockerfile_instructions((ROOT / "Dockerfile").read_text()):
        if keyword == "FROM":
            words = [word for word in args.split() if not word.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages[name] = Stage(name, words[0])
        elif stages:
            list(stages.values())[-1].instructions.append((keyword, args))
    return stages


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def target_instructions(target: str) -> list[tuple[str, str]]:
    """The instructions a target runs, its parent stages' first: what it inherits counts."""
    stages = dockerfile_stages()
    chain = [stages[target]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return [instruction for stage in reversed(chain) for instruction in stage.instructions]


def target_env(target: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in target_instructions(target):
        if keyword == "ENV":
            words = shlex.split(args)
            if "=" in words[0]:
                env.update(word.split("=", 1) for word in words)
            else:
                env[words[0]] = " ".join(words[1:])
    return env


def last(target: str, keyword: str) -> str | None:
    found = [args for name, args in target_instructions(target) if name == keyword]
    return found[-1] if found else None


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule, close enough for the patterns used here: the last pattern that matches the
    path or one of its parent folders decides."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        alternatives = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch(prefix, alt) for prefix in prefixes for alt in alternatives):
            excluded = not negated
    return excluded


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to the repository) for each bind mount."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts[volume["target"]] = volume["source"]
            continue
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = source
    return mounts


@cache
def k8s_resources() -> dict[str, dict[str, Any]]:
    """kind -> the one resource of that kind in deploy/k8s, the example Secret included."""
    resources = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and "kind" in document and document["kind"] != "Kustomization":
                assert document["kind"] not in resources, f"two {document['kind']} resources"
                resources[document["kind"]] = document
    return resources


def gateway_container() -> dict[str, Any]:
    (container,) = k8s_resources()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


# ---------------------------------------------------------------- every file parses


@pytest.mark.parametrize("path", YAML_FILES, ids=_relative)
def test_yaml_parses(path: Path) -> None:
    documents = [document for document in yaml.safe_load_all(path.read_text()) if document is not None]
    assert documents, f"{_relative(path)} is empty"


@pytest.mark.parametrize("path", JSON_FILES, ids=_relative)
def test_json_parses(path: Path) -> None:
    json.loads(path.read_text())


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_has_cpu_and_gpu_targets() -> None:
    assert {"cpu", "gpu"} <= set(dockerfile_stages())


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_target_runs_as_non_root(target: str) -> None:
    user = last(target, "USER")
    assert user is not None, f"target {target} has no USER, so it runs as root"
    assert user.split(":")[0] not in {"root", "0"}


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_target_serves_and_checks_health(target: str) -> None:
    healthcheck = last(target, "HEALTHCHECK")
    assert healthcheck is not None and healthcheck.upper() != "NONE"
    assert "/health" in healthcheck
    exposed = [port for keyword, args in target_instructions(target) if keyword == "EXPOSE" for port in args.split()]
    assert f"{PORT}" in exposed or f"{PORT}/tcp" in exposed
    assert json.loads(last(target, "ENTRYPOINT") or "null") == ["lora-gateway"]
    assert json.loads(last(target, "CMD") or "null") == ["serve"]


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_target_keeps_state_in_its_volume(target: str) -> None:
    env = target_env(target)
    volumes = [args for keyword, args in target_instructions(target) if keyword == "VOLUME"]
    assert any(STATE_DIR in volume.split() or f'"{STATE_DIR}"' in volume for volume in volumes)
    assert env.get(f"{ENV_PREFIX}STATE_DIR") == STATE_DIR
    assert env.get(f"{ENV_PREFIX}DEMO_DIR", "").startswith(STATE_DIR + "/")
    # The default, 127.0.0.1, is unreachable from outside a container.
    assert env.get(f"{ENV_PREFIX}HOST") == "0.0.0.0"


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    sources = []
    for stage in dockerfile_stages().values():
        for keyword, args in stage.instructions:
            if keyword not in {"COPY", "ADD"}:
                continue
            words = json.loads(args) if args.startswith("[") else shlex.split(args)
            if any(word.startswith("--from") for word in words):
                continue  # from another stage, not the repository
            sources += [word for word in words if not word.startswith("--")][:-1]
    assert sources, "the Dockerfile copies nothing from the repository"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        in_context = not dockerignore_excludes(source.removeprefix("./").rstrip("/"))
        assert in_context, f"COPY {source}: .dockerignore excludes it"


@pytest.mark.parametrize("path", [".venv", ".git", "tests", "state", "docs", "server/__pycache__/app.cpython-311.pyc"])
def test_dockerignore_keeps_local_files_out(path: str) -> None:
    assert dockerignore_excludes(path)


def test_dockerignore_keeps_the_packages_in() -> None:
    modules = [p for package in ("server", "adapters") for p in (ROOT / package).rglob("*.py")]
    assert modules
    for module in modules:
        assert not dockerignore_excludes(_relative(module)), f".dockerignore excludes {_relative(module)}"


# ---------------------------------------------------------------- docker-compose.yml


def test_compose_builds_and_mounts_only_what_exists() -> None:
    services = compose()["services"]
    for name, service in services.items():
        if "build" in service:
            build = service["build"] if isinstance(service["build"], dict) else {"context": service["build"]}
            dockerfile = ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name} builds from {dockerfile}, which does not exist"
            if "target" in build:
                assert build["target"] in dockerfile_stages(), f"{name}: no build target {build['target']}"
        for target, source in compose_bind_mounts(service).items():
            assert (ROOT / source).exists(), f"{name} mounts {source} at {target}, which does not exist"


def test_compose_gateway() -> None:
    gateway = compose()["services"]["gateway"]
    assert gateway["build"]["target"] == "cpu"
    assert any(str(port).endswith(f":{PORT}") for port in gateway["ports"])
    assert gateway.get("shm_size"), "vLLM's CPU worker needs more than the default 64 MB /dev/shm"
    assert any(str(volume).split(":")[1] == STATE_DIR for volume in gateway["volumes"])
    # Required: compose stops with a message when it is unset (tests/security/test_shipped_configs.py).
    assert gateway["environment"][f"{ENV_PREFIX}ADMIN_KEY"].startswith("${LORA_GATEWAY_ADMIN_KEY:?")
    assert "/health" in " ".join(gateway["healthcheck"]["test"])


def test_prometheus_scrapes_the_gateway() -> None:
    prometheus = compose()["services"]["prometheus"]
    mounts = compose_bind_mounts(prometheus)
    assert mounts.get("/etc/prometheus/prometheus.yml") == "./deploy/prometheus/prometheus.yml"
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = [
        job
        for job in config["scrape_configs"]
        if any(f"gateway:{PORT}" in static["targets"] for static in job.get("static_configs", []))
    ]
    assert len(jobs) == 1, "no scrape job targets gateway:8000"
    assert jobs[0].get("metrics_path", "/metrics") == "/metrics"
    assert jobs[0]["scrape_interval"] == "5s"


def test_grafana_provisioning_matches_its_mounts() -> None:
    services = compose()["services"]
    mounts = compose_bind_mounts(services["grafana"])
    assert mounts.get("/etc/grafana/provisioning") == "./deploy/grafana/provisioning"
    provisioning = DEPLOY / "grafana" / "provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in services
    (provider,) = yaml.safe_load((provisioning / "dashboards/lora-gateway.yml").read_text())["providers"]
    dashboards_path = provider["options"]["path"]
    assert mounts.get(dashboards_path) == "./deploy/grafana/dashboards"
    assert (DEPLOY / "grafana" / "dashboards").is_dir()
    dashboard = DEPLOY / "grafana" / "dashboards" / "lora-gateway.json"
    assert dashboard in JSON_FILES, "test_json_parses must parse the dashboard"
    panels = json.loads(dashboard.read_text())["panels"]
    sources = {p["datasource"]["uid"] for p in panels if p["type"] != "row"}
    assert sources == {datasource["uid"]}, "every panel must use the provisioned data source"


# ---------------------------------------------------------------- deploy/k8s


def test_kustomization_lists_existing_files_and_no_example_secret() -> None:
    resources = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert resources
    for resource in resources:
        assert (K8S / resource).is_file(), f"kustomization.yaml lists {resource}, which does not exist"
    examples = [resource for resource in resources if "example" in resource]
    assert not examples, f"kustomization.yaml must never apply the placeholder in {examples}"


def test_deployment_probes_and_gpu() -> None:
    container = gateway_container()
    assert container["image"] == "lora-gateway:gpu"
    assert container["args"] == ["serve"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports.get("http") == PORT
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in {"http", PORT}
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_deployment_pod_settings() -> None:
    deployment = k8s_resources()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["terminationGracePeriodSeconds"] == 60
    # A Service named lora-gateway would otherwise inject LORA_GATEWAY_PORT=tcp://...:8000.
    assert pod["enableServiceLinks"] is False


def test_deployment_refers_to_the_other_resources() -> None:
    resources = k8s_resources()
    container = gateway_container()
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}
    claim = mounts[STATE_DIR]["persistentVolumeClaim"]["claimName"]
    assert claim == resources["PersistentVolumeClaim"]["metadata"]["name"]
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"

    config_maps = [source["configMapRef"]["name"] for source in container["envFrom"] if "configMapRef" in source]
    assert config_maps == [resources["ConfigMap"]["metadata"]["name"]]
    assert resources["ConfigMap"]["data"].get(f"{ENV_PREFIX}STATE_DIR", STATE_DIR) == STATE_DIR

    (admin_key,) = [env for env in container["env"] if env["name"] == f"{ENV_PREFIX}ADMIN_KEY"]
    secret_ref = admin_key["valueFrom"]["secretKeyRef"]
    assert secret_ref["optional"] is False
    secret = resources["Secret"]
    assert secret_ref["name"] == secret["metadata"]["name"]
    assert secret_ref["key"] in {**secret.get("stringData", {}), **secret.get("data", {})}


def test_service_and_servicemonitor_reach_the_pod() -> None:
    resources = k8s_resources()
    pod_labels = resources["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = resources["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http" and port["port"] == PORT
    monitor = resources["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"


# ---------------------------------------------------------------- environment variables


def test_every_lora_gateway_variable_is_a_setting() -> None:
    known = {ENV_PREFIX + name.upper() for name in [*Settings.model_fields, *PENDING_SETTINGS]}
    files = [ROOT / "Dockerfile", COMPOSE, *(path for path in DEPLOY.rglob("*") if path.is_file())]
    used = {
        (_relative(path), name)
        for path in files
        for name in re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]+\b", path.read_text())
    }
    assert used, "no LORA_GATEWAY_* variable found at all"
    unknown = sorted(f"{path}: {name}" for path, name in used if name not in known)
    assert not unknown, "not a setting in server.config.Settings: " + ", ".join(unknown)
