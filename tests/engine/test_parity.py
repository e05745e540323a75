"""Token-for-token parity with Hugging Face PEFT, through the official openai client."""

from __future__ import annotations

import asyncio
import itertools

import openai
import pytest

from adapters.demo import BASE_ANSWER, DEMO_PROMPT
from tests.engine.conftest import ADMIN_KEY, SMALL_KV_CACHE, start_gateway, stop_gateway
from tests.engine.reference import PeftReference

pytestmark = pytest.mark.engine

MAX_TOKENS = 20
MIXED_BATCH_SECONDS = 240
PROMPTS = ["Once upon a time", "The sea is", "Tell me about the ship", DEMO_PROMPT]


@pytest.fixture(scope="session")
def reference(demo) -> PeftReference:
    return PeftReference(demo.base, demo.adapters)


@pytest.fixture
def client(gateway) -> openai.AsyncOpenAI:
    return openai_client(gateway)


def openai_client(gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=ADMIN_KEY, max_retries=0)


@pytest.fixture(scope="module")
def vllm_ops_gateway(demo, tmp_path_factory):
    """A second gateway on vLLM's own LoRA ops (--lora-ops vllm): base requests run through the zero adapter."""
    state = tmp_path_factory.mktemp("state-vllm-ops")
    args = [
        "--demo-dir", str(demo.root), "--state-dir", str(state), "--admin-key", ADMIN_KEY,
        "--max-loras", "1", "--max-cpu-loras", "8", "--kv-cache-fraction", SMALL_KV_CACHE,
    ]  # fmt: skip
    running = start_gateway([*args, "--lora-ops", "vllm"], state / "gateway.log", base_name="demo")
    running.adapters = dict(demo.adapters)
    yield running
    stop_gateway(running, wait=False)


def models(gateway) -> list[str]:
    return [gateway.base_name, *sorted(gateway.adapters)]


def adapter_of(gateway, model: str) -> str | None:
    return None if model == gateway.base_name else model


async def complete(client: openai.AsyncOpenAI, model: str, prompt: str, stream: bool) -> str:
    if not stream:
        response = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        return response.choices[0].text
    parts = []
    async for chunk in await client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
    ):
        parts.extend(choice.text for choice in chunk.choices)
    return "".join(parts)


async def chat(client: openai.AsyncOpenAI, model: str, prompt: str, stream: bool) -> str:
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        response = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0
        )
        return response.choices[0].message.content or ""
    parts = []
    async for chunk in await client.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    ):
        parts.extend(choice.delta.content or "" for choice in chunk.choices)
    return "".join(parts)


def expected(reference: PeftReference, adapter: str | None, endpoint: str, prompt: str) -> str:
    if endpoint == "completions":
        return reference.completion(adapter, prompt, MAX_TOKENS)
    return reference.chat(adapter, (("user", prompt),), MAX_TOKENS)


async def test_demo_adapters_give_their_trained_answers(gateway, client, demo):
    for name, answer in demo.answers.items():
        assert await chat(client, name, DEMO_PROMPT, stream=False) == answer
    assert await chat(client, gateway.base_name, DEMO_PROMPT, stream=False) == BASE_ANSWER


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_each_model_alone_matches_peft(gateway, client, reference, stream):
    for model in models(gateway):
        for prompt in PROMPTS[:2]:
            adapter = adapter_of(gateway, model)
            assert await complete(client, model, prompt, stream) == expected(reference, adapter, "completions", prompt)
            assert await chat(client, model, prompt, stream) == expected(reference, adapter, "chat", prompt)


@pytest.fixture(params=["grouped", "vllm"])
def ops_gateway(request):
    """The session's gateway (the grouped LoRA ops), or the second one on vLLM's ops: started here,
    in the test's setup, rather than from inside its event loop."""
    return request.getfixturevalue("gateway" if request.param == "grouped" else "vllm_ops_gateway")


async def test_base_parity_in_mixed_batches(ops_gateway, reference):
    """Base and adapter requests in flight together, the one --max-loras slot taken: no adapter may
    bleed into another row, with the grouped LoRA ops (base rows get none) or with vLLM's (base rows
    run through the zero adapter)."""
    gateway = ops_gateway
    cases = list(itertools.product(models(gateway), PROMPTS, ["completions", "chat"], [False, True]))
    # A client of its own, closed after: its connections do not outlive the test on the session's loop.
    async with openai_client(gateway) as client:
        calls = [
            (complete if endpoint == "completions" else chat)(client, model, prompt, stream)
            for model, prompt, endpoint, stream in cases
        ]
        # Each answer takes seconds; past this, fail with the gateway's log rather than wait out the
        # client's 10-minute timeout.
        try:
            outputs = await asyncio.wait_for(asyncio.gather(*calls), MIXED_BATCH_SECONDS)
        except TimeoutError:
            pytest.fail(f"{len(cases)} requests unanswered after {MIXED_BATCH_SECONDS} s:\n{gateway.log_tail()}")
    mismatches = [
        f"{model} {endpoint} stream={stream} {prompt!r}: got {got!r}, PEFT {want!r}"
        for (model, prompt, endpoint, stream), got in zip(cases, outputs, strict=True)
        if got != (want := expected(reference, adapter_of(gateway, model), endpoint, prompt))
    ]
    assert not mismatches, "\n".join(mismatches)
    # The oracle must tell each two models apart on some prompt, or the comparison above proves
    # nothing (the weather adapter, taught only tool calls, answers some prompts as the base does).
    answers = {m: [expected(reference, adapter_of(gateway, m), "chat", p) for p in PROMPTS] for m in models(gateway)}
    for first, second in itertools.combinations(models(gateway), 2):
        assert answers[first] != answers[second], (first, second)
