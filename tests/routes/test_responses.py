"""The Responses API over the fake engine: refusals naming their param, the event order of a stream,
stored responses (retrieve, input items, delete, another tenant's 404s), retention and the count limit."""

from __future__ import annotations

import json
import time

import pytest

from adapters.responses_db import ResponseRecords
from server.engine.protocol import EngineDead, OutputConstraint
from tests.conftest import full_gateway
from tests.fakes import FakeEngine
from tests.routes.test_batches import tenant_key
from tests.routes.test_completions import sse_payloads

pytestmark = pytest.mark.imports("vllm")  # in this process: see tests/conftest.py

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


async def create(gw, headers=None, **body):
    payload = {"model": "alpha", "input": "hi", "max_output_tokens": 3} | body
    return await gw.client.post("/v1/responses", json=payload, headers=headers or {})


async def test_a_response_is_the_chat_completion_of_the_same_messages(gateway):
    response = await create(gateway, instructions="Be brief.", store=False)
    assert response.status_code == 200, response.text
    body = response.json()
    chat = await gateway.client.post(
        "/v1/chat/completions",
        json={
            "model": "alpha",
            "max_tokens": 3,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        },
    )
    prompts = [prompt for _, prompt, _, _ in gateway.engine.generated[-2:]]
    assert prompts[0] == prompts[1]
    (message,) = body["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "incomplete"
    assert message["content"][0]["text"] == chat.json()["choices"][0]["message"]["content"]
    assert body["object"] == "response" and body["id"].startswith("resp_") and body["model"] == "alpha"
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    usage = chat.json()["usage"]
    assert body["usage"]["input_tokens"] == usage["prompt_tokens"]
    assert body["usage"]["output_tokens"] == usage["completion_tokens"] == 3
    assert body["usage"]["total_tokens"] == usage["total_tokens"]


async def test_input_items_become_the_chat_messages_with_tool_calls(gateway):
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Paris?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    response = await create(gateway, input=items, tools=[WEATHER], tool_choice="none", store=False)
    assert response.status_code == 200, response.text
    _, prompt, _, _ = gateway.engine.generated[-1]
    expected = [
        {"role": "user", "content": "Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    assert gateway.engine.rendered[-1] == expected
    chat_tool = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
    assert prompt == gateway.engine.render_chat(expected, [chat_tool])


async def test_a_named_function_gives_a_function_call_item(gateway):
    response = await create(
        gateway, tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"}, store=False
    )
    assert response.status_code == 200, response.text
    (call,) = response.json()["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["call_id"].startswith("call_")
    assert call["arguments"] == "alpha-0 alpha-1 alpha-2 "
    _, _, options, _ = gateway.engine.generated[-1]
    assert json.loads(options.constraint.json_schema) == WEATHER["parameters"]


@pytest.mark.parametrize(
    ("text_format", "constraint"),
    [
        ({"type": "json_object"}, OutputConstraint(json_object=True)),
        (
            {"type": "json_schema", "name": "answer", "schema": {"type": "object"}},
            OutputConstraint('{"type":"object"}'),
        ),
        ({"type": "text"}, None),
    ],
)
async def test_text_format_is_the_chat_routes_response_format(gateway, text_format, constraint):
    response = await create(gateway, text={"format": text_format}, store=False)
    assert response.status_code == 200, response.text
    assert response.json()["text"] == {"format": text_format}
    assert gateway.engine.constraints[-1] == constraint


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "web_search_preview"}]}, "tools[0].type"),
        ({"tools": [WEATHER, {"type": "file_search", "vector_store_ids": ["v"]}]}, "tools[1].type"),
        ({"tools": [{"type": "computer_use_preview"}]}, "tools[0].type"),
        ({"background": True}, "background"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": 10_000}, "max_output_tokens"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0]"),
        ({"input": ["hi", {"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0]"),
        ({"input": [{"role": "user", "content": "hi"}, {"type": "web_search_call"}]}, "input[1]"),
        ({"input": [{"role": "tool", "content": "hi"}]}, "input[0]"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0]"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools.name"),
        ({"previous_response_id": "resp_nope"}, "previous_response_id"),
    ],
)
async def test_refusals_name_their_param(gateway, fields, param):
    response = await create(gateway, **fields)
    assert response.status_code in (400, 404), response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert isinstance(error["code"], str) and error["message"]
    assert gateway.engine.generated == []


async def test_the_stream_sends_openai_events_in_order(gateway):
    response = await create(gateway, stream=True, max_output_tokens=2)
    assert response.status_code == 200, response.text
    events = sse_payloads(response.text)
    assert [event["sequence_number"] for event in events] == list(range(len(events))), events
    assert [event["type"] for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    text = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == text == events[6]["text"] == "alpha-0 alpha-1 "
    assert events[0]["response"]["status"] == "in_progress" and final["status"] == "incomplete"
    assert final["usage"]["output_tokens"] == 2
    stored = await gateway.client.get(f"/v1/responses/{final['id']}")
    assert stored.status_code == 200 and stored.json() == final


async def test_a_streamed_function_call_sends_its_arguments(gateway):
    choice = {"type": "function", "name": "get_weather"}
    response = await create(gateway, stream=True, tools=[WEATHER], tool_choice=choice, max_output_tokens=2)
    events = sse_payloads(response.text)
    kinds = [event["type"] for event in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert events[5]["arguments"] == "alpha-0 alpha-1 " and events[5]["name"] == "get_weather"
    assert events[-1]["response"]["output"][0]["arguments"] == "alpha-0 alpha-1 "


async def test_a_failure_after_the_start_ends_with_response_failed(gateway):
    engine = gateway.engine
    generate = engine.generate

    async def dies_after_a_step(*args, **kwargs):
        async for step in generate(*args, **kwargs):
            yield step
            engine.healthy = False
            raise EngineDead("the engine died")

    engine.generate = dies_after_a_step
    response = await create(gateway, stream=True, store=False)
    events = sse_payloads(response.text)
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == "response.failed"
    assert [event["type"] for event in events][2:5] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert "engine" in failed["error"]["message"]


async def test_stored_responses_continue_list_and_delete_and_are_the_tenants_own(tmp_path):
    async with full_gateway(tmp_path / "state", FakeEngine(max_model_len=4096, cache_size=3)) as gw:
        acme, other = await tenant_key(gw, "acme"), await tenant_key(gw, "other")
        first = await create(gw, acme, model="base", input="one", metadata={"k": "v"})
        assert first.status_code == 200, first.text
        first_id = first.json()["id"]
        second = await create(gw, acme, model="base", input="two", previous_response_id=first_id)
        assert second.status_code == 200, second.text
        _, prompt, _, _ = gw.engine.generated[-1]
        answer = first.json()["output"][0]["content"][0]["text"]
        history = [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "two"},
        ]
        assert prompt == gw.engine.render_chat(history, None)
        assert second.json()["previous_response_id"] == first_id

        got = await gw.client.get(f"/v1/responses/{first_id}", headers=acme)
        assert got.status_code == 200 and got.json() == first.json() and got.json()["metadata"] == {"k": "v"}
        items = (await gw.client.get(f"/v1/responses/{first_id}/input_items", headers=acme)).json()
        assert items["object"] == "list" and items["has_more"] is False
        (item,) = items["data"]
        assert item["role"] == "user" and item["content"] == [{"type": "input_text", "text": "one"}]
        assert items["first_id"] == items["last_id"] == item["id"]

        for path in (f"/v1/responses/{first_id}", f"/v1/responses/{first_id}/input_items"):
            refused = await gw.client.get(path, headers=other)
            assert refused.status_code == 404 and refused.json()["error"]["code"] == "response_not_found"
        assert (await gw.client.delete(f"/v1/responses/{first_id}", headers=other)).status_code == 404
        theirs = await create(gw, other, model="base", previous_response_id=first_id)
        assert theirs.status_code == 404 and theirs.json()["error"]["param"] == "previous_response_id"

        deleted = await gw.client.delete(f"/v1/responses/{first_id}", headers=acme)
        assert deleted.json() == {"id": first_id, "object": "response", "deleted": True}
        assert (await gw.client.get(f"/v1/responses/{first_id}", headers=acme)).status_code == 404


async def test_input_items_page_in_either_order(gateway):
    items = [{"role": "user", "content": f"m{i}"} for i in range(5)]
    response = (await create(gateway, input=items)).json()
    path = f"/v1/responses/{response['id']}/input_items"
    newest = (await gateway.client.get(path, params={"limit": 2})).json()
    assert [i["content"][0]["text"] for i in newest["data"]] == ["m4", "m3"] and newest["has_more"]
    rest = (await gateway.client.get(path, params={"limit": 5, "after": newest["last_id"]})).json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["m2", "m1", "m0"] and not rest["has_more"]
    oldest = (await gateway.client.get(path, params={"order": "asc", "limit": 1})).json()
    assert [i["content"][0]["text"] for i in oldest["data"]] == ["m0"]


async def test_a_tenant_stores_at_most_its_limit_and_expired_ones_go(tmp_path):
    async with full_gateway(tmp_path / "state", response_retention_days=1) as gw:
        acme = await tenant_key(gw, "acme", max_stored_responses=2)
        ids = [(await create(gw, acme, model="base")).json()["id"] for _ in range(2)]
        refused = await create(gw, acme, model="base")
        assert refused.status_code == 429, refused.text
        assert "max_stored_responses" in refused.json()["error"]["message"]
        generated = len(gw.engine.generated)
        assert (await create(gw, acme, model="base", store=False)).status_code == 200
        assert len(gw.engine.generated) == generated + 1

        await gw.client.delete(f"/v1/responses/{ids[0]}", headers=acme)
        assert (await create(gw, acme, model="base")).status_code == 200

        records = ResponseRecords(gw.registry.catalog)
        later = time.time() + 86400 + 1
        assert records.get(ids[1], later) is None  # expired: no longer served
        assert records.prune(later) == 2
        assert records.count("acme", time.time()) == 0


async def test_another_gateway_on_the_catalog_continues_a_stored_conversation(tmp_path):
    catalog = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    async with (
        full_gateway(tmp_path / "one", FakeEngine(max_model_len=4096, cache_size=3), catalog_url=catalog) as one,
        full_gateway(tmp_path / "two", FakeEngine(max_model_len=4096, cache_size=3), catalog_url=catalog) as two,
    ):
        acme = await tenant_key(one, "acme")
        first = (await create(one, acme, model="base", input="one")).json()
        await two.app.state.catalog_sync.check()  # the tenant and its key, as the sync loop would find them
        second = await create(two, acme, model="base", input="two", previous_response_id=first["id"])
        assert second.status_code == 200, second.text
        assert [m["content"] for m in two.engine.rendered[-1]] == [
            "one",
            first["output"][0]["content"][0]["text"],
            "two",
        ]
        assert (await two.client.get(f"/v1/responses/{second.json()['id']}", headers=acme)).status_code == 200


async def test_a_deleted_tenant_leaves_no_stored_response(full):
    acme = await tenant_key(full, "acme")
    stored = (await create(full, acme, model="base", input="a")).json()
    records = ResponseRecords(full.registry.catalog)
    assert records.get(stored["id"], time.time()) is not None
    assert (await full.client.delete("/v1/tenants/acme", headers=full.admin)).status_code in (200, 204)
    assert records.get(stored["id"], time.time()) is None
