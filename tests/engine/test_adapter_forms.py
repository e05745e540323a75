"""Adapters in the forms training scripts write, served by the real engine: PEFT's .bin and MiniMind's .pth."""

from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.demo import DEMO_PROMPT
from tests.engine.conftest import ADMIN_KEY
from tests.engine.reference import PeftReference

pytestmark = pytest.mark.engine

MAX_TOKENS = 20
PROMPTS = ["Once upon a time", "The sea is"]


@pytest.fixture
async def client(gateway):
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=120) as http:
        yield http


async def upload(client: httpx.AsyncClient, name: str, files: list, **fields: str) -> dict:
    response = await client.post("/v1/adapters", data={"name": name, **fields}, files=files)
    assert response.status_code == 201, response.text
    return response.json()


async def complete(client: httpx.AsyncClient, model: str, prompt: str) -> str:
    response = await client.post(
        "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


async def chat(client: httpx.AsyncClient, model: str) -> str:
    response = await client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": DEMO_PROMPT}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        },
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


async def test_a_peft_bin_adapter_answers_as_peft_does_on_the_original(gateway, client, demo, tmp_path):
    original = demo.adapters["pirate"]
    torch.save(load_file(str(original / "adapter_model.safetensors")), tmp_path / "adapter_model.bin")
    files = [
        ("file", ("adapter_config.json", (original / "adapter_config.json").read_bytes())),
        ("file", ("adapter_model.bin", (tmp_path / "adapter_model.bin").read_bytes())),
    ]
    card = await upload(client, "pirate-bin", files)
    try:
        assert card["rank"] == 8
        reference = PeftReference(demo.base, {"pirate": original})
        for prompt in PROMPTS:
            assert await complete(client, "pirate-bin", prompt) == reference.completion("pirate", prompt, MAX_TOKENS)
        answer = await chat(client, "pirate-bin")
        assert answer == reference.chat("pirate", (("user", DEMO_PROMPT),), MAX_TOKENS)
        assert answer == demo.answers["pirate"]
    finally:
        await client.delete("/v1/adapters/pirate-bin")


def minimind_lora(rank: int = 8, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Known weights in MiniMind's save_lora layout on the demo base's square layers; layer 0 as DDP saves it."""
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for layer in range(2):
        prefix = "module." if layer == 0 else ""
        for module in ("q_proj", "o_proj"):
            key = f"{prefix}model.layers.{layer}.self_attn.{module}.lora"
            tensors[f"{key}.A.weight"] = torch.randn(rank, 256, generator=generator) * scale
            tensors[f"{key}.B.weight"] = torch.randn(256, rank, generator=generator) * scale
    return tensors


class HandMerged:
    """The base model in transformers with W + B·A applied to each MiniMind module by hand."""

    def __init__(self, base_path, tensors: dict[str, torch.Tensor]):
        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        self.base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
        self.model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for key, a in tensors.items():
                if key.endswith(".lora.A.weight"):
                    b = tensors[key.removesuffix(".A.weight") + ".B.weight"]
                    modules[key.removeprefix("module.").removesuffix(".lora.A.weight")].weight += b @ a

    def completion(self, prompt: str, *, base: bool = False) -> str:
        ids = torch.tensor([self.tokenizer.encode(prompt)])
        with torch.no_grad():
            output = (self.base if base else self.model).generate(
                ids,
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                attention_mask=torch.ones_like(ids),
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return self.tokenizer.decode(output[0, ids.shape[1] :].tolist(), skip_special_tokens=True)


async def test_a_minimind_pth_answers_as_the_base_with_b_a_added_by_hand(gateway, client, demo, tmp_path):
    tensors = minimind_lora()
    torch.save(tensors, tmp_path / "lora_demo_256.pth")
    files = [("file", ("lora_demo_256.pth", (tmp_path / "lora_demo_256.pth").read_bytes()))]
    card = await upload(client, "minimind", files, format="minimind")
    try:
        assert card["rank"] == 8 and card["target_modules"] == ["o_proj", "q_proj"]
        reference = HandMerged(demo.base, tensors)
        expected = {prompt: reference.completion(prompt) for prompt in PROMPTS}
        # The weights change the answer, so that equal outputs mean the adapter was applied, unscaled.
        assert any(expected[prompt] != reference.completion(prompt, base=True) for prompt in PROMPTS)
        for prompt in PROMPTS:
            assert await complete(client, "minimind", prompt) == expected[prompt]
    finally:
        await client.delete("/v1/adapters/minimind")
