from __future__ import annotations

import asyncio
import json

import pytest

from tests.fakes import FakeEngine


def sse_payloads(body: str) -> list:
    events = [line.removeprefix("data: ") for line in body.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_completion_runs_through_the_named_adapter(gateway):
    response = await gateway.client.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 3})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["model"] == "alpha"
    assert body["choices"] == [
        {"index": 0, "text": "alpha-0 alpha-1 alpha-2 ", "logprobs": None, "finish_reason": "length"}
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    (_, prompt_ids, options, adapter) = gateway.engine.generated[-1]
    assert prompt_ids == gateway.engine.encode("hi")
    assert options.max_tokens == 3 and not options.stream
    assert adapter.adapter_id == gateway.registry.find("", "alpha").adapter_id


async def test_base_model_runs_through_the_zero_adapter(gateway):
    response = await gateway.client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 1})
    assert response.status_code == 200
    adapter = gateway.engine.generated[-1][3]
    assert adapter.name.startswith("base@")
    # the zero adapter was added at start
    assert gateway.engine.added[0] == adapter.adapter_id


async def test_sampling_parameters_reach_the_engine(gateway):
    payload = {
        "model": "beta",
        "prompt": "x",
        "max_tokens": 4,
        "temperature": 0.3,
        "top_p": 0.5,
        "n": 2,
        "stop": ["beta-2"],
        "seed": 7,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logprobs": 2,
    }
    response = await gateway.client.post("/v1/completions", json=payload)
    assert response.status_code == 200, response.text
    options = gateway.engine.generated[-1][2]
    assert (options.temperature, options.top_p, options.n, options.stop, options.seed) == (0.3, 0.5, 2, ("beta-2",), 7)
    assert (options.presence_penalty, options.frequency_penalty, options.logprobs) == (0.5, -0.5, 2)
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert choices[0]["text"] == "beta-0 beta-1 "
    logprobs = choices[0]["logprobs"]
    assert logprobs["tokens"] == ["beta-0 ", "beta-1 "]
    assert logprobs["text_offset"] == [0, 7]


async def test_batch_prompts_give_one_choice_per_prompt_and_n(gateway):
    response = await gateway.client.post(
        "/v1/completions", json={"model": "alpha", "prompt": ["a", "bb"], "n": 2, "max_tokens": 1}
    )
    assert response.status_code == 200
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 2 + 3


async def test_token_id_prompts_are_accepted_and_checked(gateway):
    ok = await gateway.client.post("/v1/completions", json={"model": "alpha", "prompt": [5, 6, 7], "max_tokens": 1})
    assert ok.status_code == 200
    assert gateway.engine.generated[-1][1] == [5, 6, 7]
    bad = await gateway.client.post("/v1/completions", json={"model": "alpha", "prompt": [5, 99999], "max_tokens": 1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


async def test_stream_ends_with_done_and_reports_usage(gateway):
    payload = {
        "model": "alpha",
        "prompt": "hey",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await gateway.client.post("/v1/completions", json=payload)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = sse_payloads(response.text)
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == "alpha-0 alpha-1 alpha-2 "
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 3,
        "total_tokens": 7,
    }
    assert gateway.engine.generated[-1][2].stream


async def asgi_messages(app, path: str, payload: dict) -> list[dict]:
    """What the app sends for one request; each body message is a send on the socket under uvicorn."""
    body = json.dumps(payload).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("gateway", 80),
    }
    requests = [{"type": "http.request", "body": body, "more_body": False}]
    messages = []

    async def receive():
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the client stays

    async def send(message):
        messages.append(message)

    await app(scope, receive, send)
    return messages


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_a_stream_writes_once_per_engine_step(gateway, path):
    payload = {"model": "alpha", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    payload |= {"prompt": "hey"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hey"}]}
    messages = await asgi_messages(gateway.app, path, payload)
    bodies = [m for m in messages if m["type"] == "http.response.body"]
    writes = [m["body"] for m in bodies]
    assert len(writes) == 3  # the fake engine's three steps, and the last one ends the body
    assert [m["more_body"] for m in bodies] == [True, True, False]
    # The last step's write carries the finish, the usage and DONE; chat's first also the role.
    last = [event for event in writes[-1].split(b"\n\n") if event]
    assert len(last) == 3 and b'"finish_reason":"length"' in last[0] and b'"usage"' in last[1]
    assert last[2] == b"data: [DONE]"
    if path != "/v1/completions":
        assert writes[0].count(b"data: ") == 2 and b'"role":"assistant"' in writes[0]


async def test_unknown_model_is_404_and_lists_nothing(gateway):
    response = await gateway.client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error" and error["param"] == "model"
    assert "nope" in error["message"]
    for other in ("alpha", "beta", "base"):
        assert other not in error["message"]
    assert gateway.engine.generated == []


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ({"max_tokens": -3}, "max_tokens"),
        ({"logprobs": 9}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"prompt": ""}, "prompt"),
        ({"model": ""}, "model"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"max_tokens": "many"}, "max_tokens"),
    ],
)
async def test_invalid_values_are_400_naming_the_parameter(gateway, patch, param):
    payload = {"model": "alpha", "prompt": "hi"} | patch
    response = await gateway.client.post("/v1/completions", json=payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].split(".")[0] == param
    assert isinstance(error["code"], str)


@pytest.mark.parametrize("param", ["best_of", "suffix", "tools"])
async def test_unsupported_parameters_are_refused_not_dropped(gateway, param):
    response = await gateway.client.post("/v1/completions", json={"model": "alpha", "prompt": "hi", param: 1})
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": f"parameter '{param}' is not supported by this server",
        "type": "invalid_request_error",
        "param": param,
        "code": "unsupported_parameter",
    }


async def test_null_parameters_mean_not_given(gateway):
    response = await gateway.client.post(
        "/v1/completions", json={"model": "alpha", "prompt": "hi", "logit_bias": None, "seed": None}
    )
    assert response.status_code == 200


async def test_missing_prompt_and_bad_json(gateway):
    missing = await gateway.client.post("/v1/completions", json={"model": "alpha"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"
    garbage = await gateway.client.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert garbage.status_code == 400 and garbage.json()["error"]["type"] == "invalid_request_error"


async def test_prompt_plus_max_tokens_must_fit_the_context(gateway):
    # FakeEngine's context is 64 tokens; "hi" encodes to 3.
    response = await gateway.client.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 62})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert "61" in error["message"]
    too_long = await gateway.client.post("/v1/completions", json={"model": "alpha", "prompt": "x" * 100})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prompt"
    assert gateway.engine.generated == []


async def test_dead_engine_is_503(gateway):
    gateway.engine.healthy = False
    response = await gateway.client.post("/v1/completions", json={"model": "alpha", "prompt": "hi"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "engine_unavailable"
    ready = await gateway.client.get("/ready")
    assert ready.status_code == 503
    assert (await gateway.client.get("/health")).status_code == 200


async def test_engine_dying_mid_stream_ends_with_an_error_event(gateway, monkeypatch):
    original = FakeEngine.generate

    async def dies_after_one(self, *args):
        async for step in original(self, *args):
            yield step
            self.healthy = False
            from server.engine.protocol import EngineDead

            raise EngineDead("gone")

    monkeypatch.setattr(FakeEngine, "generate", dies_after_one)
    response = await gateway.client.post(
        "/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 5, "stream": True}
    )
    chunks = sse_payloads(response.text)
    assert chunks[0]["choices"][0]["text"] == "alpha-0 "
    assert chunks[-1]["error"]["code"] == "engine_unavailable"


async def test_return_token_ids_extension(gateway):
    plain = await gateway.client.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2})
    assert "token_ids" not in plain.json()["choices"][0]
    payload = {"model": "alpha", "prompt": "hi", "max_tokens": 2, "return_token_ids": True, "stream": True}
    chunks = sse_payloads((await gateway.client.post("/v1/completions", json=payload)).text)
    assert [c["choices"][0]["token_ids"] for c in chunks] == [[100], [101]]
