"""TGI's and LoRAX's API over the FakeEngine: shapes, parameter refusals, errors and tenancy."""

from __future__ import annotations

import json

import pytest

from tests.adapter_files import make_adapter
from tests.conftest import full_gateway
from tests.routes.test_tenancy import new_tenant, upload

pytestmark = pytest.mark.imports("vllm")  # in this process: see tests/conftest.py


def events(body: str) -> list[dict]:
    """TGI's server-sent events; TGI sends no [DONE]."""
    lines = [line.removeprefix("data: ") for line in body.split("\n\n") if line.startswith("data: ")]
    assert "[DONE]" not in lines
    return [json.loads(line) for line in lines]


async def test_generate_runs_the_named_adapter_with_greedy_decoding(gateway):
    response = await gateway.client.post(
        "/generate", json={"inputs": "hi", "parameters": {"adapter_id": "alpha", "max_new_tokens": 3}}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"generated_text": "alpha-0 alpha-1 alpha-2 "}
    _, prompt_ids, options, adapter = gateway.engine.generated[-1]
    assert prompt_ids == gateway.engine.encode("hi")
    assert adapter.adapter_id == gateway.registry.find("", "alpha").adapter_id
    assert (options.max_tokens, options.temperature, options.seed, options.logprobs) == (3, 0.0, None, None)
    assert options.include_stop_str  # TGI's text keeps the stop sequence


async def test_no_adapter_id_is_the_base_model_and_so_is_its_name(gateway):
    for parameters in ({"max_new_tokens": 1}, {"max_new_tokens": 1, "adapter_id": "base"}):
        response = await gateway.client.post("/generate", json={"inputs": "hi", "parameters": parameters})
        assert response.status_code == 200
        assert gateway.engine.generated[-1][3].name.startswith("base@")


async def test_details_carry_tgi_and_lorax_fields(gateway):
    body = {
        "inputs": "hi",
        "parameters": {"adapter_id": "beta", "max_new_tokens": 2, "details": True, "decoder_input_details": True},
    }
    response = await gateway.client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    details = response.json()["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 2 and details["seed"] is None
    assert details["tokens"] == [
        {"id": 100, "text": "<100>", "logprob": -0.5, "special": False, "skipped": False},
        {"id": 101, "text": "<101>", "logprob": -0.5, "special": False, "skipped": False},
    ]
    prompt = gateway.engine.encode("hi")
    assert details["prefill"] == [
        {"id": t, "text": f"<{t}>", "logprob": None if i == 0 else -1.0} for i, t in enumerate(prompt)
    ]
    assert (details["prompt_tokens"], details["skipped_tokens"]) == (len(prompt), 0)
    options = gateway.engine.generated[-1][2]
    assert options.prompt_logprobs == 0 and options.logprobs == 0


async def test_sampling_parameters_reach_the_engine_and_the_seed_is_reported(gateway):
    parameters = {
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "repetition_penalty": 1.2,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "seed": 42,
        "stop": ["beta-2"],
        "max_new_tokens": 4,
        "details": True,
        "ignore_eos_token": True,
        "api_token": "ignored",
        "adapter_id": "beta",
    }
    response = await gateway.client.post("/generate", json={"inputs": "x", "parameters": parameters})
    assert response.status_code == 200, response.text
    options = gateway.engine.generated[-1][2]
    assert (options.temperature, options.top_p, options.top_k, options.repetition_penalty) == (0.7, 0.9, 5, 1.2)
    assert (options.frequency_penalty, options.presence_penalty, options.seed) == (0.5, -0.5, 42)
    assert options.stop == ("beta-2",) and options.ignore_eos
    details = response.json()["details"]
    assert details["seed"] == 42 and details["finish_reason"] == "stop_sequence"


async def test_a_warper_samples_as_in_tgi_and_a_random_seed_is_reported(gateway):
    response = await gateway.client.post(
        "/generate", json={"inputs": "x", "parameters": {"temperature": 0.5, "max_new_tokens": 1, "details": True}}
    )
    options = gateway.engine.generated[-1][2]
    assert options.temperature == 0.5 and options.seed is not None
    assert response.json()["details"]["seed"] == options.seed
    # temperature 0 is greedy even with do_sample, as in LoRAX
    await gateway.client.post(
        "/generate", json={"inputs": "x", "parameters": {"do_sample": True, "temperature": 0, "max_new_tokens": 1}}
    )
    assert gateway.engine.generated[-1][2].temperature == 0.0


async def test_return_full_text_and_truncate(gateway):
    response = await gateway.client.post(
        "/generate",
        json={"inputs": "hello", "parameters": {"max_new_tokens": 1, "return_full_text": True, "truncate": 2}},
    )
    assert response.json() == {"generated_text": "hellobase-0 "}
    assert gateway.engine.generated[-1][1] == gateway.engine.encode("hello")[-2:]


async def test_generate_stream_sends_token_events_and_the_full_text_last(gateway):
    body = {"inputs": "hi", "parameters": {"adapter_id": "alpha", "max_new_tokens": 3, "details": True, "seed": 1}}
    response = await gateway.client.post("/generate_stream", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    stream = events(response.text)
    assert [e["token"]["id"] for e in stream] == [100, 101, 102]
    assert [e["token"]["text"] for e in stream] == ["alpha-0 ", "alpha-1 ", "alpha-2 "]
    assert [e["index"] for e in stream] == [1, 2, 3]
    assert [e["generated_text"] for e in stream] == [None, None, "alpha-0 alpha-1 alpha-2 "]
    assert stream[0]["details"] is None
    assert stream[-1]["details"] == {
        "finish_reason": "length",
        "generated_tokens": 3,
        "seed": None,
        "input_length": 3,
        "prompt_tokens": 3,
    }


async def test_compat_route_dispatches_on_stream(gateway):
    plain = await gateway.client.post("/", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    assert plain.status_code == 200
    assert plain.json() == [{"generated_text": "base-0 base-1 "}]
    streamed = await gateway.client.post(
        "/", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}, "stream": True}
    )
    assert events(streamed.text)[-1]["generated_text"] == "base-0 base-1 "


async def test_info_and_ping(gateway):
    info = (await gateway.client.get("/info")).json()
    assert info["model_id"] == "base"
    assert (info["max_input_tokens"], info["max_total_tokens"]) == (63, 64)
    assert info["max_best_of"] == 1 and info["max_stop_sequences"] == 4 and info["version"]
    assert (await gateway.client.get("/ping")).status_code == 200
    gateway.engine.healthy = False
    assert (await gateway.client.get("/ping")).json() == {"error": "unhealthy", "error_type": "healthcheck"}


REFUSED = [
    ({"typical_p": 0.5}, "typical_p"),
    ({"watermark": True}, "watermark"),
    ({"grammar": {"type": "regex", "value": "(a+"}}, "grammar"),
    ({"top_n_tokens": 2}, "top_n_tokens"),
    ({"best_of": 2, "do_sample": True}, "best_of"),
    ({"return_k_alternatives": 2}, "return_k_alternatives"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"apply_chat_template": True}, "apply_chat_template"),
    ({"unknown_knob": 1}, "unknown_knob"),
    ({"temperature": -1}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_p": 0}, "top_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 1000}, "max_new_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"truncate": 0}, "truncate"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"adapter_id": "alpha", "merged_adapters": {"ids": ["alpha"], "weights": [1]}}, "merged_adapters"),
]


@pytest.mark.parametrize(("parameters", "named"), REFUSED, ids=[named for _, named in REFUSED])
async def test_parameters_that_cannot_be_honoured_are_refused_with_422(gateway, parameters, named):
    before = len(gateway.engine.generated)
    response = await gateway.client.post("/generate", json={"inputs": "hi", "parameters": parameters})
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == "validation"
    assert named.split("_")[0] in body["error"] or named in body["error"], body
    assert len(gateway.engine.generated) == before


async def test_prefill_details_cannot_stream_and_stream_must_match_the_route(gateway):
    body = {"inputs": "hi", "parameters": {"decoder_input_details": True}}
    assert (await gateway.client.post("/generate_stream", json=body)).status_code == 422
    assert (await gateway.client.post("/generate", json={"inputs": "hi", "stream": True})).status_code == 422
    assert (await gateway.client.post("/generate", json={"inputs": ""})).json()["error"] == "`inputs` cannot be empty"


@pytest.mark.parametrize("source", ["hub", "s3", "pbase", "local"])
async def test_foreign_adapter_sources_say_to_register_first(gateway, source):
    response = await gateway.client.post(
        "/generate", json={"inputs": "hi", "parameters": {"adapter_id": "org/some-lora", "adapter_source": source}}
    )
    assert response.status_code == 400
    assert response.json()["error_type"] == "validation"
    assert "register the adapter first (POST /v1/adapters)" in response.json()["error"]


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/"])
async def test_every_failure_is_in_tgi_shape(gateway, path):
    cases = [
        (b"{not json", 400),
        (b'{"parameters": {}}', 422),
        (b'{"inputs": 3}', 422),
        (b'{"inputs": "x", "parameters": {"adapter_id": "nope"}}', 404),
    ]
    for raw, status in cases:
        response = await gateway.client.post(path, content=raw, headers={"content-type": "application/json"})
        assert response.status_code == status, (raw, response.text)
        assert set(response.json()) == {"error", "error_type"}, response.text
        assert "/nowhere" not in response.text and "Traceback" not in response.text
    assert set((await gateway.client.get(path)).json()) == {"error", "error_type"} or path == "/"
    gateway.engine.healthy = False
    dead = await gateway.client.post(path, json={"inputs": "x"})
    assert dead.status_code == 503 and dead.json()["error_type"] == "generation"


async def test_a_failure_mid_stream_is_a_final_error_event(gateway):
    gateway.engine.refuse_all = True  # the adapter is not yet accepted: its lease loads it, and fails
    await gateway.registry.unregister(gateway.registry.find("", "alpha"))
    from adapters.spec import SHARED
    from tests.fakes import fake_spec

    await gateway.registry.register(SHARED, "gamma", fake_spec("gamma"))
    response = await gateway.client.post(
        "/generate_stream", json={"inputs": "hi", "parameters": {"adapter_id": "gamma"}}
    )
    assert response.status_code == 200
    assert events(response.text) == [
        {"error": "the engine could not load adapter 'gamma': refused", "error_type": "validation"}
    ]


async def test_tgi_routes_are_counted_in_metrics(gateway):
    await gateway.client.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": "alpha"}})
    await gateway.client.post("/", json={"inputs": "hi", "stream": True, "parameters": {"max_new_tokens": 2}})
    metrics = (await gateway.client.get("/metrics")).text
    assert 'lora_gateway_requests_total{adapter="alpha",endpoint="generate",status="200"} 1.0' in metrics
    assert 'lora_gateway_requests_total{adapter="base",endpoint="generate_stream",status="200"} 1.0' in metrics
    assert 'lora_gateway_generation_tokens_total{adapter="base"} 2.0' in metrics


@pytest.fixture
async def tenants(tmp_path):
    """Tenants a and b; a owns 'mine' and 'other' (rank 8), b owns 'theirs'."""
    async with full_gateway(tmp_path / "state", zero_adapter=False) as gw:
        gw.keys = {"a": await new_tenant(gw, "a"), "b": await new_tenant(gw, "b")}
        for tenant, name, seed in (("a", "mine", 1), ("a", "other", 2), ("b", "theirs", 3)):
            made = make_adapter(tmp_path / name, seed=seed)
            assert (await upload(gw, gw.keys[tenant], name, made)).status_code == 201
        yield gw


async def test_another_tenants_adapter_answers_as_a_missing_one(tenants):
    def call(key, adapter):
        body = {"inputs": "x", "parameters": {"adapter_id": adapter, "max_new_tokens": 1}}
        return tenants.client.post("/generate", json=body, headers=tenants.as_(key))

    assert (await call(tenants.keys["a"], "mine")).status_code == 200
    theirs, ghost = await call(tenants.keys["a"], "theirs"), await call(tenants.keys["a"], "ghost")
    assert theirs.status_code == ghost.status_code == 404
    assert theirs.json()["error"] == ghost.json()["error"].replace("ghost", "theirs")
    assert theirs.json()["error_type"] == "not_found"
    missing_key = await tenants.client.post("/generate", json={"inputs": "x"})
    assert missing_key.status_code == 401 and missing_key.json()["error_type"] == "authentication"


async def test_merged_adapters_compose_once_per_recipe_and_stay_with_their_tenant(tenants):
    merge = {"ids": ["mine", "other"], "weights": [0.7, 0.3], "merge_strategy": "ties", "density": 0.5}
    body = {"inputs": "x", "parameters": {"merged_adapters": merge, "max_new_tokens": 1}}
    first = await tenants.client.post("/generate", json=body, headers=tenants.as_(tenants.keys["a"]))
    assert first.status_code == 200, first.text
    cache = tenants.app.state.merged_adapters
    assert cache.composed == 1
    adapter = tenants.engine.generated[-1][3]
    assert adapter.name.startswith("a/merged-")
    again = await tenants.client.post("/generate", json=body, headers=tenants.as_(tenants.keys["a"]))
    assert again.status_code == 200 and cache.composed == 1  # cached under the recipe and the inputs' hashes
    assert tenants.engine.generated[-1][3] == adapter
    # another recipe is another composition
    other = {**body, "parameters": {**body["parameters"], "merged_adapters": {**merge, "density": 0.6}}}
    assert (
        await tenants.client.post("/generate", json=other, headers=tenants.as_(tenants.keys["a"]))
    ).status_code == 200
    assert cache.composed == 2
    # invisible to the tenant's lists, and b cannot use a's inputs
    listed = (await tenants.client.get("/v1/adapters", headers=tenants.as_(tenants.keys["a"]))).json()["data"]
    assert {card["name"] for card in listed} == {"mine", "other"}
    refused = await tenants.client.post("/generate", json=body, headers=tenants.as_(tenants.keys["b"]))
    assert refused.status_code == 404 and "'mine'" in refused.json()["error"]


MERGE_REFUSALS = [
    ({"ids": ["mine"], "merge_strategy": "cat"}, "merge_strategy"),
    ({"ids": ["mine", "other"], "merge_strategy": "ties"}, "density"),
    ({"ids": ["mine", "other"], "merge_strategy": "linear", "density": 0.5}, "density"),
    ({"ids": ["mine", "other"], "merge_strategy": "linear", "majority_sign_method": "total"}, "majority_sign_method"),
    ({"ids": ["mine", "other"], "weights": [1.0]}, "weights"),
    ({"ids": ["mine", "base"]}, "base model"),
]


@pytest.mark.parametrize(("merge", "named"), MERGE_REFUSALS, ids=[n for _, n in MERGE_REFUSALS])
async def test_merged_adapters_refusals(tenants, merge, named):
    body = {"inputs": "x", "parameters": {"merged_adapters": merge}}
    response = await tenants.client.post("/generate", json=body, headers=tenants.as_(tenants.keys["a"]))
    assert response.status_code == 400, response.text
    assert response.json()["error_type"] == "validation" and named in response.json()["error"]


async def test_merged_adapters_are_evicted_past_their_bound(tenants):
    cache = tenants.app.state.merged_adapters if hasattr(tenants.app.state, "merged_adapters") else None
    headers = tenants.as_(tenants.keys["a"])
    body = {"inputs": "x", "parameters": {"merged_adapters": {"ids": ["mine", "other"], "weights": [1, 0.5]}}}
    assert (await tenants.client.post("/generate", json=body, headers=headers)).status_code == 200
    cache = tenants.app.state.merged_adapters
    cache.max_entries = 1
    first = cache.entries()[0]
    body["parameters"]["merged_adapters"]["weights"] = [1, 0.25]
    assert (await tenants.client.post("/generate", json=body, headers=headers)).status_code == 200
    assert cache.entries() != [first] and len(cache.entries()) == 1
    assert first.retired and first.adapter_id in tenants.engine.removed
