"""Structured outputs and forced tool calls through Ray: the ingress checks the constraint, the
replica's engine applies it, and the tokens are PEFT's under the same grammar's masks."""

from __future__ import annotations

import json

import httpx
import pytest

from adapters.demo import DEMO_TOOL
from tests.engine.conftest import ADMIN_KEY
from tests.engine.reference import PeftReference
from tests.engine.test_structured import SCHEMA, ConstrainedPeft, chat_body, expected, json_format
from tests.engine.test_tools import FORCED, ask, prompt_ids, vllm_schema

pytestmark = [pytest.mark.engine, pytest.mark.ray, pytest.mark.timeout(300)]

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def peft(demo) -> ConstrainedPeft:
    return ConstrainedPeft(PeftReference(demo.base, demo.adapters))


def post(ray_gateway, body: dict) -> httpx.Response:
    return httpx.post(f"{ray_gateway.url}/v1/chat/completions", json=body, headers=ADMIN, timeout=120)


def test_a_json_schema_through_the_replicas_matches_peft(ray_gateway, peft):
    for model in ("pirate", "demo"):
        response = post(ray_gateway, chat_body(model, **json_format(SCHEMA)))
        assert response.status_code == 200, response.text
        adapter = None if model == "demo" else model
        assert response.json()["choices"][0]["token_ids"] == list(expected(peft, adapter, "json", json.dumps(SCHEMA)))


def test_a_bad_schema_is_a_400_from_the_ingress(ray_gateway):
    bad = {"type": "integer", "multipleOf": 3}  # a keyword xgrammar cannot enforce
    response = post(ray_gateway, chat_body("pirate", stream=True, **json_format(bad)))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "response_format"


def test_a_named_tool_call_through_the_replicas_matches_peft(ray_gateway, peft):
    body = {
        "model": "pirate",
        "messages": ask("Oslo"),
        "tools": [DEMO_TOOL],
        "tool_choice": FORCED["named"],
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_tokens": 48,
        "return_token_ids": True,
    }
    response = post(ray_gateway, body)
    assert response.status_code == 200, response.text
    schema = vllm_schema(FORCED["named"], parallel_tool_calls=False)
    want = peft.generate("pirate", prompt_ids(peft, ask("Oslo")), peft.json_schema(schema))
    choice = response.json()["choices"][0]
    assert choice["token_ids"] == want
    if choice["finish_reason"] != "length":
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
