from __future__ import annotations

from tests.routes.test_completions import sse_payloads


async def test_chat_uses_the_chat_template_and_adapter(gateway):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    response = await gateway.client.post(
        "/v1/chat/completions", json={"model": "beta", "messages": messages, "max_tokens": 2}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "beta-0 beta-1 "}
    assert body["choices"][0]["finish_reason"] == "length"
    prompt_ids = gateway.engine.generated[-1][1]
    assert prompt_ids == gateway.engine.render_chat(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    )


async def test_chat_max_tokens_defaults_to_the_room_left(gateway):
    response = await gateway.client.post(
        "/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert response.status_code == 200
    prompt_ids, options = gateway.engine.generated[-1][1], gateway.engine.generated[-1][2]
    assert options.max_tokens == gateway.engine.max_model_len - len(prompt_ids)


async def test_max_completion_tokens_is_honoured(gateway):
    response = await gateway.client.post(
        "/v1/chat/completions",
        json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2},
    )
    assert response.json()["usage"]["completion_tokens"] == 2


async def test_chat_stream_starts_with_role_and_ends_with_usage(gateway):
    payload = {
        "model": "alpha",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await gateway.client.post("/v1/chat/completions", json=payload)
    chunks = sse_payloads(response.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == "alpha-0 alpha-1 "
    assert chunks[-1]["usage"]["completion_tokens"] == 2 and chunks[-1]["choices"] == []


async def test_chat_logprobs(gateway):
    payload = {
        "model": "alpha",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
        "logprobs": True,
        "top_logprobs": 1,
    }
    response = await gateway.client.post("/v1/chat/completions", json=payload)
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert content[0]["token"] == "alpha-0 " and content[0]["logprob"] == -0.5
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["alpha-0 "]


async def test_chat_refuses_bad_messages(gateway):
    cases = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ]
    for patch, param in cases:
        response = await gateway.client.post("/v1/chat/completions", json={"model": "alpha"} | patch)
        assert response.status_code == 400, patch
        assert response.json()["error"]["param"].split(".")[0] == param, patch
