"""Another model family: a tiny Qwen2 with PEFT adapters of mixed ranks and targets, built here."""

from __future__ import annotations

import asyncio
import shutil

import openai
import pytest
import torch

from tests.engine.conftest import start_gateway, stop_gateway
from tests.engine.reference import PeftReference

pytestmark = pytest.mark.engine

ADAPTERS = {"qa": (8, ("q_proj", "v_proj")), "qb": (16, ("o_proj", "gate_proj", "up_proj", "down_proj"))}
PROMPTS = ["The sea is", "Once upon a time", "Tell me about the ship"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def qwen2(demo, tmp_path_factory):
    """A random tiny Qwen2 (with the demo's tokenizer) and two random LoRA adapters for it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("qwen2")
    base = root / "base"
    tokenizer = AutoTokenizer.from_pretrained(demo.base)
    tokenizer.save_pretrained(base)
    torch.manual_seed(7)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,  # wide logits: greedy decoding with clear margins
    )
    Qwen2ForCausalLM(config).save_pretrained(base)
    paths = {}
    for index, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + index)
        model = get_peft_model(
            Qwen2ForCausalLM.from_pretrained(base),
            LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), lora_dropout=0.0),
        )
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.5)  # PEFT starts B at zero; make the adapter matter
        paths[name] = root / name
        model.save_pretrained(paths[name])
        readme = paths[name] / "README.md"
        if readme.exists():
            readme.unlink()
    yield base, paths
    shutil.rmtree(root, ignore_errors=True)


async def test_qwen2_base_and_adapters_match_peft_in_mixed_batches(qwen2, tmp_path):
    base, paths = qwen2
    args = [
        "--model",
        str(base),
        "--served-model-name",
        "qbase",
        "--dtype",
        "float32",
        "--max-loras",
        "2",
        "--max-cpu-loras",
        "4",
        "--max-lora-rank",
        "16",
        "--state-dir",
        str(tmp_path / "state"),
        "--lora-modules",
        *(f"{name}={path}" for name, path in paths.items()),
    ]
    gateway = start_gateway(args, tmp_path / "qwen2.log", base_name="qbase")
    try:
        reference = PeftReference(base, paths)
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        cases = [(model, prompt) for model in ["qbase", *paths] for prompt in PROMPTS for _ in range(2)]
        replies = await asyncio.gather(
            *(
                client.completions.create(
                    model=model,
                    prompt=prompt,
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                    extra_body={"return_token_ids": True},
                )
                for model, prompt in cases
            )
        )
        wrong = []
        for (model, prompt), reply in zip(cases, replies, strict=True):
            # token ids: text would differ only where vLLM holds back a trailing partial UTF-8 byte
            want = reference.completion_ids(None if model == "qbase" else model, prompt, MAX_TOKENS)
            got = reply.choices[0].model_extra["token_ids"]
            if got != want:
                wrong.append(f"{model} {prompt!r}: got {got}, PEFT {want}")
        assert not wrong, "\n".join(wrong)
        for prompt in PROMPTS:  # the three models really differ, or the comparison proves little
            assert len({reference.completion(a, prompt, MAX_TOKENS) for a in [None, *paths]}) == 3
    finally:
        stop_gateway(gateway, wait=False)
