"""Composed and merged adapters on the real engine, against PEFT on the same files."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.demo import DEMO_PROMPT
from adapters.merge import merge_adapter
from tests.engine.conftest import ADMIN_KEY, start_gateway, stop_gateway
from tests.engine.reference import PeftReference

pytestmark = pytest.mark.engine

MAX_TOKENS = 20
PROMPTS = ["Once upon a time", "The sea is", "Tell me about the ship"]
WEIGHTS = [0.8, 0.6]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# name -> (the compose request, PEFT's add_weighted_adapter arguments)
COMPOSITIONS = {
    "mix-cat": ({"method": "cat"}, {"combination_type": "cat"}),
    "mix-svd": ({"method": "svd"}, {"combination_type": "svd", "svd_rank": 24}),  # 8 + 16: exact
    "mix-svd8": ({"method": "svd", "rank": 8}, {"combination_type": "svd", "svd_rank": 8}),
}


@pytest.fixture(scope="module")
def reference(demo) -> PeftReference:
    reference = PeftReference(demo.base, demo.adapters)
    for name, (_, peft_kwargs) in COMPOSITIONS.items():
        reference.model.add_weighted_adapter(["pirate", "poet"], WEIGHTS, name.replace("-", "_"), **peft_kwargs)
    return reference


def peft_name(model: str) -> str | None:
    return None if model in ("demo", "merged") else model.replace("-", "_")


async def outputs(client: openai.AsyncOpenAI, model: str) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        response = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        texts.append(response.choices[0].text)
    messages = [{"role": "user", "content": DEMO_PROMPT}]
    reply = await client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    return [*texts, reply.choices[0].message.content or ""]


def expected(reference: PeftReference, adapter: str | None) -> list[str]:
    return [reference.completion(adapter, p, MAX_TOKENS) for p in PROMPTS] + [
        reference.chat(adapter, (("user", DEMO_PROMPT),), MAX_TOKENS)
    ]


async def test_cat_and_svd_compositions_match_peft_token_for_token(gateway, reference):
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=ADMIN_KEY, max_retries=0)
    registered = []
    try:
        for name, (spec, _) in COMPOSITIONS.items():
            body = {"name": name, "compose": {"adapters": ["pirate", "poet"], "weights": WEIGHTS, **spec}}
            response = httpx.post(f"{gateway.url}/v1/adapters", json=body, headers=ADMIN, timeout=60)
            assert response.status_code == 201, response.text
            registered.append(name)
            card = response.json()
            assert card["composition"]["exact"] is (name != "mix-svd8"), card
            assert card["rank"] == (8 if name == "mix-svd8" else 24)
        identity = {"name": "pirate-again", "compose": {"adapters": ["pirate"], "weights": [1.0]}}
        assert httpx.post(f"{gateway.url}/v1/adapters", json=identity, headers=ADMIN, timeout=60).status_code == 201
        registered.append("pirate-again")

        for name in COMPOSITIONS:
            assert await outputs(client, name) == expected(reference, peft_name(name)), name
        # composing one adapter with weight 1.0 gives that adapter back
        assert await outputs(client, "pirate-again") == await outputs(client, "pirate") == expected(reference, "pirate")
        # the composition answers unlike either input, so the comparisons above tell them apart
        mix, pirate, poet = (expected(reference, n) for n in ("mix_cat", "pirate", "poet"))
        assert any(m != a and m != b for m, a, b in zip(mix, pirate, poet, strict=True))
    finally:
        for name in registered:
            httpx.delete(f"{gateway.url}/v1/adapters/{name}", headers=ADMIN, timeout=30)


def transformers_outputs(model_dir) -> list[str]:
    """Greedy answers of a plain model folder in transformers, as `expected` gives PEFT's."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": DEMO_PROMPT}], add_generation_prompt=True, tokenize=False
    )
    prompts = [tokenizer.encode(p) for p in PROMPTS] + [tokenizer.encode(chat, add_special_tokens=False)]
    texts = []
    for prompt_ids in prompts:
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


async def test_merged_folder_serves_as_the_adapter_does(gateway, demo, reference, tmp_path):
    merged = merge_adapter(demo.base, demo.adapters["pirate"], tmp_path / "merged", progress=False)
    # transformers on the merged folder, with no adapter: the adapter's answers
    assert transformers_outputs(merged.folder) == expected(reference, "pirate")
    assert expected(reference, "pirate")[-1] == demo.answers["pirate"]

    # the gateway with the merged folder as its base model answers as the session gateway's pirate
    state = tmp_path / "state"
    state.mkdir()
    args = ["--model", str(merged.folder), "--served-model-name", "merged", "--dtype", "float32"]
    args += ["--kv-cache-fraction", "0.05"]  # a tiny model; leave memory to the session's engine
    second = start_gateway([*args, "--state-dir", str(state)], state / "gateway.log", base_name="merged")
    try:
        merged_client = openai.AsyncOpenAI(base_url=f"{second.url}/v1", api_key="unused", max_retries=0)
        session_client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=ADMIN_KEY, max_retries=0)
        served = await outputs(merged_client, "merged")
        assert served == await outputs(session_client, "pirate") == expected(reference, "pirate")
    finally:
        stop_gateway(second, wait=False)
