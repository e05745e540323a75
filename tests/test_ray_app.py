"""server/ray_app.py without a cluster: the Serve options, and the config's builder importable."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from server.config import Settings
from server.ray_app import deployment_options

ROOT = Path(__file__).resolve().parents[1]


def test_a_fixed_count_or_autoscaling_bounds_pass_through():
    fixed = deployment_options(Settings(ray=True, replicas=3, replica_cpus=2, max_num_seqs=16))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2.0} and fixed["max_ongoing_requests"] == 32
    scaled = deployment_options(Settings(ray=True, min_replicas=1, max_replicas=8, target_ongoing_requests=12))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 8,
        "initial_replicas": 1,
        "target_ongoing_requests": 12.0,
    }


@pytest.mark.parametrize(
    "settings, flag",
    [
        ({"min_replicas": 1, "max_replicas": 2}, "--ray"),
        ({"ray": True, "lora_ops": "vllm"}, "--lora-ops"),
        ({"ray": True, "min_replicas": 1}, "--max-replicas"),
        ({"ray": True, "min_replicas": 3, "max_replicas": 2}, "--min-replicas"),
    ],
)
def test_inconsistent_ray_settings_are_refused_naming_the_flag(settings, flag):
    with pytest.raises(ValueError, match=flag):
        Settings(**settings)


@pytest.mark.parametrize("path", ["deploy/ray/serve-config.yaml", "deploy/ray/rayservice.yaml"])
def test_the_serve_config_builds_the_application(path, demo):
    document = yaml.safe_load((ROOT / path).read_text())
    config = yaml.safe_load(document["spec"]["serveConfigV2"]) if "spec" in document else document
    (application,) = config["applications"]
    module_name, _, attribute = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    args = application["args"] | {"model": str(demo.base)}
    built = builder(args)
    assert type(built).__name__ == "Application"
    settings = Settings(ray=True, **args)
    assert settings.min_replicas == application["args"]["min_replicas"]
