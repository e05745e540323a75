"""Parity under churn: many more adapters than batch slots, engine cache entries and host-tier
bytes, in mixed batches on the real engine; every output equals PEFT's while adapters move
between the tiers (server/engine/host_tier.py)."""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from adapters.base_model import BaseModelInfo
from tests.adapter_files import make_adapter, rewrite_tensors
from tests.engine.conftest import ADMIN_KEY, SMALL_KV_CACHE, start_gateway, stop_gateway
from tests.engine.reference import PeftReference

pytestmark = pytest.mark.engine

ADAPTERS = 10
MAX_TOKENS = 12
PROMPTS = ["Once upon a time", "The sea is", "Tell me about the ship"]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_adapters(root: Path, base_dir: Path) -> dict[str, Path]:
    """ADAPTERS rank-8 adapters on every layer, with weights large enough that each one's
    greedy answers differ from the base model's and from each other's."""
    base = BaseModelInfo.from_model_dir(base_dir)
    folders = {}
    for index in range(ADAPTERS):
        folder = make_adapter(root / f"churn{index}", base, rank=8, targets=TARGETS, seed=100 + index)
        rewrite_tensors(folder, lambda tensors: tensors.update({k: v * np.float32(6) for k, v in tensors.items()}))
        folders[f"churn{index}"] = folder
    return folders


@pytest.fixture(scope="module")
def churn(demo, tmp_path_factory):
    """One gateway whose tiers are far smaller than the adapters in use: 2 batch slots, 3
    adapters ready in the engine, and a host tier of about 4 adapters' bytes."""
    root = tmp_path_factory.mktemp("churn-adapters")
    adapters = build_adapters(root, demo.base)
    one = (adapters["churn0"] / "adapter_model.safetensors").stat().st_size
    state = tmp_path_factory.mktemp("state-churn")
    args = [
        "--demo-dir", str(demo.root), "--state-dir", str(state), "--admin-key", ADMIN_KEY,
        "--max-loras", "2", "--max-cpu-loras", "3", "--adapter-cache-bytes", str(4 * one),
        "--kv-cache-fraction", SMALL_KV_CACHE,
    ]  # fmt: skip
    running = start_gateway(args, state / "gateway.log", base_name="demo")
    running.adapters = adapters
    yield running
    stop_gateway(running, wait=False)


async def test_outputs_equal_peft_while_adapters_move_between_tiers(churn, demo):
    reference = PeftReference(demo.base, churn.adapters)
    models = [churn.base_name, *churn.adapters]
    expected = {
        (model, prompt): reference.completion_ids(None if model == churn.base_name else model, prompt, MAX_TOKENS)
        for model in models
        for prompt in PROMPTS
    }
    # The adapters are told apart: a batch that applied one adapter's weights to another's rows fails.
    assert len({tuple(tuple(expected[(model, prompt)]) for prompt in PROMPTS) for model in models}) == len(models)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=churn.url, headers=headers, timeout=300) as client:
        for name, folder in churn.adapters.items():
            response = await client.post("/v1/adapters", json={"name": name, "path": str(folder)})
            assert response.status_code == 201, response.text

        async def ask(model: str, prompt: str) -> str:
            body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            response = await client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]

        rng = random.Random(7)
        wrong = []
        for round_ in range(3):
            # Every model and prompt at once, in a new order each round: batches mix up to all
            # eleven models over two slots, and each round finds other adapters in each tier.
            order = [(model, prompt) for model in models for prompt in PROMPTS]
            rng.shuffle(order)
            replies = await asyncio.gather(*(ask(model, prompt) for model, prompt in order))
            for key, text in zip(order, replies, strict=True):
                if text != reference.tokenizer.decode(expected[key], skip_special_tokens=True):
                    wrong.append((round_, *key, text))
        assert wrong == []
        scrape = (await client.get("/metrics")).text.splitlines()
        reloads = sum(
            float(line.split()[-1]) for line in scrape if line.startswith("lora_gateway_adapter_reloads_total")
        )
        assert reloads >= ADAPTERS  # adapters left the engine's cache and came back, many times
    # The engine's host tier held adapters up to its budget and served loads from memory.
    reports = re.findall(r"host tier: (\d+) adapters, (\d+) bytes, (\d+) hits, (\d+) misses", churn.log_tail(100000))
    assert reports, churn.log_tail()
    # (Whether a reload finds its adapter in a tier of 4 out of 10 depends on the shuffled order:
    # one run saw 1 hit in 29 loads, another none; the hits are the unit tests' to check.)
    counts = [tuple(int(value) for value in report) for report in reports]
    budget = 4 * (churn.adapters["churn0"] / "adapter_model.safetensors").stat().st_size
    assert all(held < ADAPTERS and size <= budget for held, size, _, _ in counts), reports
