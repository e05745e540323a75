"""What evaluation harnesses and tuned applications send, over the FakeEngine: echo with prompt
logprobs, vLLM's sampling extensions, logit_bias, message names, no-op fields, /tokenize and
/detokenize, and DELETE /v1/models/{id}."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from adapters.fine_tuning_db import FineTuningRecords, JobRow
from tests.conftest import full_gateway
from tests.fakes import fake_spec
from tests.routes.test_completions import sse_payloads


def pieces(token_ids):
    return [f"<{t}>" for t in token_ids]


# -- echo ------------------------------------------------------------------------------------------


async def test_echo_with_logprobs_returns_the_prompt_tokens_first(gateway):
    payload = {"model": "alpha", "prompt": "hi", "max_tokens": 2, "echo": True, "logprobs": 2}
    response = await gateway.client.post("/v1/completions", json=payload)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    assert choice["text"] == "hi" + "alpha-0 alpha-1 "
    prompt = gateway.engine.encode("hi")
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [*pieces(prompt), "alpha-0 ", "alpha-1 "]
    assert logprobs["token_logprobs"] == [None, -1.0, -1.0, -0.5, -0.5]
    # the first token has nothing before it; the others their own logprob and the top 2
    assert logprobs["top_logprobs"][0] is None
    assert logprobs["top_logprobs"][1] == {pieces(prompt)[1]: -1.0, "x": -2.0, "y": -3.0}
    offsets, tokens = logprobs["text_offset"], logprobs["tokens"]
    assert offsets == [sum(map(len, tokens[:i])) for i in range(len(tokens))]
    assert gateway.engine.generated[-1][2].prompt_logprobs == 2


async def test_echo_streamed_puts_the_prompt_in_each_choices_first_chunk(gateway):
    payload = {"model": "alpha", "prompt": "hi", "max_tokens": 3, "echo": True, "logprobs": 1, "stream": True}
    response = await gateway.client.post("/v1/completions", json=payload)
    assert response.status_code == 200, response.text
    chunks = [chunk["choices"][0] for chunk in sse_payloads(response.text)]
    assert "".join(c["text"] for c in chunks) == "hi" + "alpha-0 alpha-1 alpha-2 "
    prompt = gateway.engine.encode("hi")
    first = chunks[0]["logprobs"]
    assert first["tokens"][: len(prompt)] == pieces(prompt) and first["token_logprobs"][0] is None
    tokens = [t for c in chunks for t in c["logprobs"]["tokens"]]
    offsets = [o for c in chunks for o in c["logprobs"]["text_offset"]]
    assert offsets == [sum(map(len, tokens[:i])) for i in range(len(tokens))]


@pytest.mark.parametrize("stream", [False, True])
async def test_echo_with_max_tokens_0_returns_only_the_prompt(gateway, stream):
    payload = {"model": "beta", "prompt": [1, 7, 9], "max_tokens": 0, "echo": True, "logprobs": 0, "stream": stream}
    response = await gateway.client.post("/v1/completions", json=payload)
    assert response.status_code == 200, response.text
    if stream:
        chunks = [chunk["choices"][0] for chunk in sse_payloads(response.text)]
        text = "".join(c["text"] for c in chunks)
        tokens = [t for c in chunks for t in c["logprobs"]["tokens"]]
    else:
        (choice,) = response.json()["choices"]
        text, tokens = choice["text"], choice["logprobs"]["tokens"]
        assert choice["logprobs"]["top_logprobs"][1] == {"<7>": -1.0}
    assert text == "<1><7><9>"  # token ids given: the prompt's text is their decoding
    assert tokens == ["<1>", "<7>", "<9>"]
    assert gateway.engine.generated[-1][2].max_tokens == 1  # the engine needs one step for the logprobs


async def test_echo_without_logprobs_returns_only_the_text(gateway):
    payload = {"model": "alpha", "prompt": ["a", "b"], "max_tokens": 1, "echo": True, "n": 2, "temperature": 1}
    response = await gateway.client.post("/v1/completions", json=payload)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert [c["text"] for c in choices] == ["aalpha-0 ", "aalpha-0 ", "balpha-0 ", "balpha-0 "]
    assert all(c["logprobs"] is None for c in choices)
    assert gateway.engine.generated[-1][2].prompt_logprobs is None


async def test_max_tokens_0_without_echo_is_refused(gateway):
    response = await gateway.client.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 0})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens"
    assert "echo" in response.json()["error"]["message"]


# -- sampling extensions ---------------------------------------------------------------------------

EXTRAS = {
    "logit_bias": {"5": 100, "17": -100},
    "top_k": 20,
    "min_p": 0.1,
    "repetition_penalty": 1.3,
    "stop_token_ids": [2, 3],
    "skip_special_tokens": False,
    "include_stop_str_in_output": True,
}


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ],
)
async def test_vllm_sampling_extensions_reach_the_engine(gateway, route, body):
    response = await gateway.client.post(route, json={"model": "alpha", "max_tokens": 2, **body, **EXTRAS})
    assert response.status_code == 200, response.text
    options = gateway.engine.generated[-1][2]
    assert options.logit_bias == ((5, 100.0), (17, -100.0))
    assert (options.top_k, options.min_p, options.repetition_penalty) == (20, 0.1, 1.3)
    assert options.stop_token_ids == (2, 3)
    assert options.skip_special_tokens is False and options.include_stop_str is True


async def test_top_k_minus_one_means_every_token(gateway):
    response = await gateway.client.post("/v1/completions", json={"model": "alpha", "prompt": "x", "top_k": -1})
    assert response.status_code == 200
    assert gateway.engine.generated[-1][2].top_k == 0


@pytest.mark.parametrize(
    ("patch", "param", "words"),
    [
        ({"logit_bias": {"300": 1}}, "logit_bias", "not in this model's vocabulary (0 to 299)"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "less than or equal to 100"),
        ({"logit_bias": {"a token": 1}}, "logit_bias", "decimal strings"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
        ({"stop_token_ids": [299, 300]}, "stop_token_ids", "token id 300"),
        ({"top_k": -2}, "top_k", "greater than or equal to -1"),
        ({"min_p": 1.5}, "min_p", "less than or equal to 1"),
        ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ({"store": True}, "store", "stores no completions"),
        ({"service_tier": "fastest"}, "service_tier", "'auto'"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata", "at most 16"),
    ],
)
async def test_bad_extension_values_are_400_before_any_work(gateway, patch, param, words):
    response = await gateway.client.post("/v1/completions", json={"model": "alpha", "prompt": "x", **patch})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].split(".")[0] == param and words in error["message"], error
    assert gateway.engine.generated == []


async def test_bookkeeping_fields_are_accepted_and_change_nothing(gateway):
    noops = {
        "metadata": {"run": "eval-7"},
        "store": False,
        "service_tier": "auto",
        "user": "u-1",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
    }
    for route, body in [
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ]:
        plain = await gateway.client.post(route, json={"model": "alpha", "max_tokens": 2, **body})
        marked = await gateway.client.post(route, json={"model": "alpha", "max_tokens": 2, **body, **noops})
        assert marked.status_code == 200, marked.text
        assert marked.json()["choices"] == plain.json()["choices"]
        # The same sampling; only the fair queue's priority, which rises with the tenant's service, moves.
        marked_options, plain_options = gateway.engine.generated[-1][2], gateway.engine.generated[-2][2]
        assert replace(marked_options, priority=0) == replace(plain_options, priority=0)


async def test_a_message_name_reaches_the_chat_template(gateway):
    messages = [{"role": "user", "content": "hi", "name": "ada"}, {"role": "assistant", "content": "yes"}]
    response = await gateway.client.post("/v1/chat/completions", json={"model": "alpha", "messages": messages})
    assert response.status_code == 200, response.text
    assert gateway.engine.rendered[-1] == [
        {"role": "user", "content": "hi", "name": "ada"},
        {"role": "assistant", "content": "yes"},
    ]


# -- /tokenize and /detokenize ---------------------------------------------------------------------


async def test_tokenize_and_detokenize_in_vllms_shapes(gateway):
    response = await gateway.client.post("/tokenize", json={"model": "alpha", "prompt": "hi"})
    assert response.status_code == 200, response.text
    ids = gateway.engine.encode("hi")
    assert response.json() == {"count": len(ids), "max_model_len": 64, "tokens": ids, "token_strs": None}
    plain = await gateway.client.post(
        "/tokenize", json={"prompt": "hi", "add_special_tokens": False, "return_token_strs": True}
    )
    assert plain.json()["tokens"] == ids[1:] and plain.json()["token_strs"] == pieces(ids[1:])
    chat = await gateway.client.post(
        "/tokenize", json={"model": "beta", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["tokens"] == gateway.engine.render_chat([{"role": "user", "content": "hi"}])
    back = await gateway.client.post("/detokenize", json={"model": "alpha", "tokens": [1, 7]})
    assert back.status_code == 200 and back.json() == {"prompt": "<1><7>"}
    assert gateway.engine.generated == []  # nothing ran on the engine


@pytest.mark.parametrize(
    ("route", "body", "status", "param"),
    [
        ("/tokenize", {"model": "nope", "prompt": "hi"}, 404, "model"),
        ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
        ("/detokenize", {"tokens": [1, 300]}, 400, "tokens"),
        ("/detokenize", {"tokens": [1] * 65}, 400, "tokens"),
        ("/tokenize", {"prompt": "x" * 64 * 32 + "x"}, 400, "prompt"),
        ("/tokenize", {"prompt": "hi", "unknown": 1}, 400, "unknown"),
        ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False}, 400, None),
    ],
)
async def test_tokenize_refusals(gateway, route, body, status, param):
    response = await gateway.client.post(route, json=body)
    assert response.status_code == status, response.text
    if param:
        assert response.json()["error"]["param"] == param


async def test_tokenize_is_refused_to_a_tenant_for_another_tenants_model(tmp_path):
    async with full_gateway(tmp_path / "state") as gw:
        keys = {}
        for name in ("a", "b"):
            created = await gw.client.post("/v1/tenants", json={"name": name}, headers=gw.admin)
            keys[name] = created.json()["api_key"]
        await gw.registry.register("a", "mine", fake_spec("mine"))
        own = await gw.client.post("/tokenize", json={"model": "mine", "prompt": "hi"}, headers=gw.as_(keys["a"]))
        assert own.status_code == 200
        other = await gw.client.post("/tokenize", json={"model": "mine", "prompt": "hi"}, headers=gw.as_(keys["b"]))
        assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
        anonymous = await gw.client.post("/tokenize", json={"prompt": "hi"})
        assert anonymous.status_code == 401


# -- DELETE /v1/models/{id} ------------------------------------------------------------------------


async def test_a_tenant_deletes_its_fine_tuned_model_and_nothing_else(tmp_path):
    async with full_gateway(tmp_path / "state") as gw:
        keys = {}
        for name in ("a", "b"):
            created = await gw.client.post("/v1/tenants", json={"name": name}, headers=gw.admin)
            keys[name] = created.json()["api_key"]
        tuned = "ft:base:demo:abcd1234"
        records = FineTuningRecords(gw.registry.catalog)
        records.add_job(JobRow("ftjob-abcd1234", "a", "base", "running", {}, time.time()))
        records.update_job("ftjob-abcd1234", status="succeeded", fine_tuned_model=tuned)
        await gw.registry.register("a", tuned, fake_spec("tuned"))
        await gw.registry.register("a", "uploaded", fake_spec("uploaded"))
        await gw.registry.register("", "shared", fake_spec("shared"))
        a, b = gw.as_(keys["a"]), gw.as_(keys["b"])

        other = await gw.client.delete(f"/v1/models/{tuned}", headers=b)
        assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
        base = await gw.client.delete("/v1/models/base", headers=a)
        assert base.status_code == 403 and base.json()["error"]["code"] == "model_not_deletable"
        shared = await gw.client.delete("/v1/models/shared", headers=a)
        assert shared.status_code == 403 and "DELETE /v1/adapters/shared" in shared.json()["error"]["message"]
        uploaded = await gw.client.delete("/v1/models/uploaded", headers=a)
        assert uploaded.status_code == 400 and "DELETE /v1/adapters/uploaded" in uploaded.json()["error"]["message"]

        deleted = await gw.client.delete(f"/v1/models/{tuned}", headers=a)
        assert deleted.status_code == 200, deleted.text
        assert deleted.json() == {"id": tuned, "object": "model", "deleted": True}
        assert (await gw.client.get(f"/v1/models/{tuned}", headers=a)).status_code == 404
        again = await gw.client.delete(f"/v1/models/{tuned}", headers=a)
        assert again.status_code == 404
        assert gw.registry.find("a", "uploaded") is not None and gw.registry.find("", "shared") is not None
