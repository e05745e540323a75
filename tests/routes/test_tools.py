"""Tool calling on /v1/chat/completions over the fake engine: requests, constraints, response shapes."""

from __future__ import annotations

import json

import pytest

from tests.routes.test_completions import sse_payloads

pytestmark = pytest.mark.imports("vllm")  # in this process: see tests/conftest.py

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
ASK = [{"role": "user", "content": "Paris?"}]


async def chat(gateway, **body):
    return await gateway.client.post("/v1/chat/completions", json={"model": "alpha", "max_tokens": 2, **body})


async def test_auto_without_a_parser_is_a_400_that_says_what_to_do(gateway):
    response = await chat(gateway, messages=ASK, tools=[WEATHER])
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in error["message"] and '"required"' in error["message"]
    assert gateway.engine.generated == []


async def test_named_choice_is_constrained_to_the_function_parameters(gateway):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    response = await chat(gateway, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice)
    assert response.status_code == 200, response.text
    _, prompt, options, _ = gateway.engine.generated[-1]
    assert json.loads(options.constraint.json_schema) == WEATHER["function"]["parameters"]
    assert prompt == gateway.engine.render_chat([{"role": "user", "content": "Paris?"}], [WEATHER, TIME])
    result = response.json()["choices"][0]
    (call,) = result["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": "alpha-0 alpha-1 "}
    assert result["message"]["content"] is None


async def test_named_function_without_parameters_takes_an_object(gateway):
    await chat(gateway, messages=ASK, tools=[TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert json.loads(gateway.engine.generated[-1][2].constraint.json_schema) == {"type": "object", "properties": {}}


@pytest.mark.parametrize("parallel", [None, False])
async def test_required_is_an_array_of_calls_to_any_tool(gateway, parallel):
    await chat(gateway, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=parallel)
    schema = json.loads(gateway.engine.generated[-1][2].constraint.json_schema)
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert [option["properties"]["name"]["enum"] for option in schema["items"]["anyOf"]] == [
        ["get_weather"],
        ["get_time"],
    ]
    assert schema["items"]["anyOf"][0]["properties"]["parameters"] == WEATHER["function"]["parameters"]
    assert schema.get("maxItems") == (1 if parallel is False else None)


async def test_none_renders_the_tools_and_answers_in_text(gateway):
    response = await chat(gateway, messages=ASK, tools=[WEATHER], tool_choice="none")
    _, prompt, options, _ = gateway.engine.generated[-1]
    assert options.constraint is None
    assert prompt == gateway.engine.render_chat([{"role": "user", "content": "Paris?"}], [WEATHER])
    assert response.json()["choices"][0]["message"] == {"role": "assistant", "content": "alpha-0 alpha-1 "}


async def test_a_tool_round_trip_history_is_accepted(gateway):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    response = await chat(gateway, messages=messages, tools=[WEATHER], tool_choice="none")
    assert response.status_code == 200, response.text


async def test_streamed_named_call_opens_with_id_and_name_then_streams_arguments(gateway):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    response = await chat(gateway, messages=ASK, tools=[WEATHER], tool_choice=choice, stream=True)
    chunks = [payload for payload in sse_payloads(response.text) if payload != "[DONE]"]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    opening = deltas[1]["tool_calls"][0]
    assert (opening["index"], opening["type"], opening["function"]["name"]) == (0, "function", "get_weather")
    assert opening["id"].startswith("call_")
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:] if "tool_calls" in d)
    assert arguments == "alpha-0 alpha-1 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # cut short by max_tokens, as asked


BAD_REQUESTS = {
    "choice without tools": ({"tool_choice": "required"}, "tool_choice"),
    "named tool not in tools": (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    "empty tools": ({"tools": []}, "tools"),
    "duplicate names": ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools"),
    "too many tools": (
        {"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)], "tool_choice": "none"},
        "tools",
    ),
    "schema too large": (
        {
            "tools": [
                {"type": "function", "function": {"name": "big", "description": "x" * 70_000}},
            ],
            "tool_choice": "none",
        },
        "tools",
    ),
}


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_tool_requests_are_400s_before_any_work(gateway, case):
    fields, param = BAD_REQUESTS[case]
    response = await chat(gateway, messages=ASK, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert param in (error["param"] or "")
    assert gateway.engine.generated == []


async def test_a_schema_nested_too_deep_is_a_400(gateway):
    tools = [{"type": "function", "function": {"name": "deep", "parameters": nested(20)}}]
    response = await chat(gateway, messages=ASK, tools=tools, tool_choice="none")
    assert response.status_code == 400
    assert "nest deeper than 16" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "message",
    [
        {"role": "tool", "content": "sunny"},  # no tool_call_id
        {"role": "user", "content": "hi", "tool_call_id": "call_1"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": None},
        {
            "role": "user",
            "content": "hi",
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}],
        },
    ],
)
async def test_malformed_tool_messages_are_400s(gateway, message):
    response = await chat(gateway, messages=[*ASK, message])
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert gateway.engine.generated == []
