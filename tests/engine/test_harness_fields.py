"""Echo's prompt logprobs, the sampling extensions and /tokenize on the real engine, against PEFT
and the model's own tokenizer, through the official openai client where it speaks the route."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.engine.conftest import ADMIN_KEY
from tests.engine.reference import PeftReference

pytestmark = pytest.mark.engine

ADAPTER = "pirate"
PROMPT = "The crew sang shanties under the stars."
STORY = "The old captain said"  # the adapter goes on for four tokens at least
TOP = 5
TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def reference(demo) -> PeftReference:
    return PeftReference(demo.base, demo.adapters)


@pytest.fixture
def client(gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=ADMIN_KEY, max_retries=0)


async def echoed(client: openai.AsyncOpenAI, max_tokens: int, stream: bool) -> tuple[str, list, list, list]:
    """The echoed text, tokens, token logprobs and top logprobs, the stream's chunks joined."""
    request = {"model": ADAPTER, "prompt": PROMPT, "max_tokens": max_tokens, "echo": True, "logprobs": TOP}
    if not stream:
        choice = (await client.completions.create(**request, temperature=0)).choices[0]
        logprobs = choice.logprobs
        return choice.text, logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs
    text, tokens, values, tops = "", [], [], []
    async for chunk in await client.completions.create(**request, temperature=0, stream=True):
        for choice in chunk.choices:
            text += choice.text
            tokens += choice.logprobs.tokens
            values += choice.logprobs.token_logprobs
            tops += choice.logprobs.top_logprobs
    return text, tokens, values, tops


@pytest.mark.parametrize(("max_tokens", "stream"), [(1, False), (1, True), (0, False), (0, True)])
async def test_echo_prompt_logprobs_match_peft(client, reference, max_tokens, stream):
    ids = reference.tokenizer.encode(PROMPT)
    expected = reference.prompt_logprobs(ADAPTER, ids)
    text, tokens, values, tops = await echoed(client, max_tokens, stream)
    assert text.startswith(PROMPT) and (max_tokens > 0 or text == PROMPT)
    assert len(tokens) == len(ids) + max_tokens
    assert values[0] is None and tops[0] is None  # nothing comes before the first token
    for i in range(1, len(ids)):
        row = expected[i - 1]
        assert abs(values[i] - row[ids[i]].item()) < TOLERANCE, (i, values[i], row[ids[i]].item())
        # the token itself and the top 5 alternatives, with PEFT's values
        want = sorted({*torch.topk(row, TOP).indices.tolist(), ids[i]}, key=lambda t: -row[t].item())
        got = sorted(tops[i].values(), reverse=True)
        assert len(got) == len(want)
        assert all(abs(g - row[t].item()) < TOLERANCE for g, t in zip(got, want, strict=True)), (i, got)


async def test_logit_bias_min_p_top_k_and_stop_token_ids_act_in_the_engine(client, reference):
    greedy = reference.completion_ids(ADAPTER, STORY, 4)
    assert len(greedy) == 4  # no end of sequence among them

    async def token_ids(body: dict | None = None, **sampling) -> tuple[list[int], str]:
        response = await client.completions.create(
            model=ADAPTER,
            prompt=STORY,
            max_tokens=4,
            extra_body={"return_token_ids": True, **(body or {})},
            **sampling,
        )
        choice = response.choices[0]
        return choice.model_extra["token_ids"], choice.finish_reason

    forced = next(t for t in range(10, reference.tokenizer.vocab_size) if t not in greedy)
    assert (await token_ids(temperature=0, logit_bias={str(forced): 100}))[0] == [forced] * 4
    # Sampling at temperature 1 keeps only the most likely token with min_p 1 or top_k 1: greedy.
    assert (await token_ids(temperature=1, seed=3, body={"min_p": 1.0}))[0] == greedy
    assert (await token_ids(temperature=1, seed=3, body={"top_k": 1}))[0] == greedy
    stop_at = next(i for i in range(1, 4) if greedy[i] not in greedy[:i])
    ids, finish = await token_ids(temperature=0, body={"stop_token_ids": [greedy[stop_at]]})
    assert ids == greedy[: stop_at + 1] and finish == "stop"


async def test_tokenize_and_detokenize_match_the_models_tokenizer(gateway, reference):
    tokenizer = reference.tokenizer
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=60) as http:
        plain = (
            await http.post("/tokenize", json={"model": ADAPTER, "prompt": PROMPT, "return_token_strs": True})
        ).json()
        ids = tokenizer.encode(PROMPT)
        assert plain == {
            "count": len(ids),
            "max_model_len": plain["max_model_len"],
            "tokens": ids,
            "token_strs": tokenizer.convert_ids_to_tokens(ids),
        }
        messages = [{"role": "user", "content": PROMPT}]
        chat = (await http.post("/tokenize", json={"model": ADAPTER, "messages": messages})).json()
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert chat["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
        back = (await http.post("/detokenize", json={"model": ADAPTER, "tokens": ids})).json()
        assert back == {"prompt": tokenizer.decode(ids)}


def test_the_readme_example_runs_as_printed(gateway):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Evaluation harnesses") :]
    script = section[section.index("python - <<'PY'\n") + len("python - <<'PY'\n") : section.index("\nPY\n")]
    env = {**os.environ, "OPENAI_BASE_URL": f"{gateway.url}/v1", "OPENAI_API_KEY": ADMIN_KEY}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1] == " buried gold", run.stdout  # the pirate's own continuation (PEFT's greedy one)
    assert len(lines) == 3
