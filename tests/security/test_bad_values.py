"""Values the engine would fail on are a 400 (TGI: 422) naming the field, never a 500; an explicit
null means "not given" on every field; names have a length cap."""

from __future__ import annotations

import pytest

from tests.security.hostile import chat, completion, generate, hostile_world

OPENAI = {"completions": ("/v1/completions", completion), "chat": ("/v1/chat/completions", chat)}


@pytest.fixture
async def gw(tmp_path):
    async with hostile_world(tmp_path) as world:
        yield world


async def post(gw, route: str, body: dict):
    return await gw.client.post(OPENAI[route][0], json=body, headers=gw.tenant)


@pytest.mark.parametrize("route", OPENAI)
async def test_a_seed_is_an_int64(gw, route):
    for seed in (2**64, 2**63, -(2**63) - 1, 10**30):
        response = await post(gw, route, OPENAI[route][1](seed=seed))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "seed" and error["code"] == "invalid_value"
        assert str(2**63 - 1) in error["message"]
    assert gw.engine.generated == []
    for seed in (2**63 - 1, -(2**63), 0):
        response = await post(gw, route, OPENAI[route][1](seed=seed))
        assert response.status_code == 200, response.text
        assert gw.engine.generated[-1][2].seed == seed


@pytest.mark.parametrize("route", OPENAI)
async def test_min_tokens_above_max_tokens_is_400(gw, route):
    response = await post(gw, route, OPENAI[route][1](max_tokens=2, min_tokens=3))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "min_tokens" and "max_tokens (2)" in error["message"]
    assert gw.engine.generated == []


async def test_min_tokens_above_the_room_chat_leaves_is_400(gw):
    # without max_tokens, chat may use the room the context leaves (64 tokens in all here)
    response = await post(gw, "chat", chat(max_tokens=None, min_tokens=100))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "min_tokens"
    assert (await post(gw, "chat", chat(max_tokens=None, min_tokens=3))).status_code == 200


@pytest.mark.parametrize("route", OPENAI)
async def test_several_choices_need_sampling(gw, route):
    # vLLM refuses n > 1 with greedy decoding, with an error the gateway used to turn into a 500
    response = await post(gw, route, OPENAI[route][1](n=2, temperature=0))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "n"
    assert gw.engine.generated == []


COMPLETION_NULLS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "n": 1,
    "stream": False,
    "stream_options": None,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "max_tokens": 16,
    "stop": (),
    "logprobs": None,
    "seed": None,
    "user": None,
    "min_tokens": 0,
    "ignore_eos": False,
    "return_token_ids": False,
}


async def test_null_means_not_given_on_every_completions_field(gw):
    body = {"model": "mine", "prompt": "x"} | dict.fromkeys(COMPLETION_NULLS)
    response = await post(gw, "completions", body)
    assert response.status_code == 200, response.text
    options = gw.engine.generated[-1][2]
    assert (options.temperature, options.top_p, options.n, options.stream) == (1.0, 1.0, 1, False)
    assert (options.presence_penalty, options.frequency_penalty, options.max_tokens) == (0.0, 0.0, 16)
    assert (options.stop, options.logprobs, options.seed, options.min_tokens, options.ignore_eos) == (
        (),
        None,
        None,
        0,
        False,
    )


async def test_null_means_not_given_on_every_chat_field(gw):
    nulls = set(COMPLETION_NULLS) - {"logprobs"} | {"max_completion_tokens", "logprobs", "top_logprobs"}
    message = {"role": "user", "content": "x", "name": None}
    body = {"model": "mine", "messages": [message]} | dict.fromkeys(nulls)
    response = await post(gw, "chat", body)
    assert response.status_code == 200, response.text
    options = gw.engine.generated[-1][2]
    prompt = gw.engine.generated[-1][1]
    assert (options.temperature, options.n, options.logprobs, options.max_tokens) == (1.0, 1, None, 64 - len(prompt))
    streamed = await post(gw, "chat", chat(stream=True, stream_options={"include_usage": None}))
    assert streamed.status_code == 200 and '"usage"' not in streamed.text


@pytest.mark.parametrize("route", OPENAI)
@pytest.mark.parametrize("length", [257, 4 * 1024 * 1024])
async def test_a_model_name_has_a_length_cap(gw, route, length):
    response = await post(gw, route, OPENAI[route][1]("m" * length))
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["param"] == "model" and "256 characters" in error["message"]
    assert len(response.content) < 400


async def test_merged_adapter_names_have_a_length_cap(gw):
    merge = {"ids": ["mine", "m" * 4096]}
    body = {"inputs": "x", "parameters": {"merged_adapters": merge}}
    response = await gw.client.post("/generate", json=body, headers=gw.tenant)
    assert response.status_code == 422, response.text[:300]
    assert "256 characters" in response.json()["error"] and len(response.content) < 400


async def test_tgi_temperature_is_bounded_as_the_engine_bounds_it(gw):
    response = await gw.client.post("/generate", json=generate(temperature=2.5), headers=gw.tenant)
    assert response.status_code == 422, response.text
    assert "temperature" in response.json()["error"] and "2.0" in response.json()["error"]
    assert gw.engine.generated == []
