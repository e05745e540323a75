"""Structured outputs on the routes (server/openai/structured.py): each form's constraint reaches
the engine, and a bad one is a 400 (TGI: 422) before the engine or a stream starts."""

from __future__ import annotations

import json

import pytest

from server.engine.protocol import OutputConstraint
from server.openai.structured import MAX_GRAMMAR_BYTES, MAX_SCHEMA_DEPTH, GrammarChecker
from tests.races import cancel_as_it_takes_the_slot

pytestmark = pytest.mark.imports("vllm")  # in this process: see tests/conftest.py

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
COMPACT = json.dumps(SCHEMA, separators=(",", ":"))
CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "alpha", "prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize(
    ("extra", "constraint"),
    [
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, OutputConstraint(json_object=True)),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "City", "schema": SCHEMA}}},
            OutputConstraint(json_schema=COMPACT),
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "City", "schema": SCHEMA, "strict": True, "description": "a city"},
                }
            },
            OutputConstraint(json_schema=COMPACT),
        ),
        ({"structured_outputs": {"json": SCHEMA}}, OutputConstraint(json_schema=COMPACT)),
        ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, OutputConstraint(json_schema=COMPACT)),
        ({"structured_outputs": {"regex": "[a-z]{3}"}}, OutputConstraint(regex="[a-z]{3}")),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, OutputConstraint(choice=("yes", "no"))),
        ({"structured_outputs": {"grammar": 'root ::= "a" | "b"'}}, OutputConstraint(grammar='root ::= "a" | "b"')),
        ({"structured_outputs": {"json_object": True}}, OutputConstraint(json_object=True)),
    ],
)
@pytest.mark.parametrize(("path", "body"), [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
async def test_each_form_reaches_the_engine_as_its_constraint(gateway, path, body, extra, constraint):
    response = await gateway.client.post(path, json=body | extra)
    assert response.status_code == 200, response.text
    assert gateway.engine.constraints == [constraint]


BAD = [
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
        "response_format",
    ),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": SCHEMA}}}, None),
    ({"response_format": {"type": "json_schema"}}, None),
    ({"response_format": {"type": "xml"}}, None),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {"type": "integer", "multipleOf": 3}},
            }
        },
        "response_format",
    ),
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": 'root ::= "a'}}, "structured_outputs"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": [1, 2]}}, None),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, None),
    ({"structured_outputs": {}}, None),
    ({"structured_outputs": {"choice": []}}, None),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    (
        {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
        "structured_outputs",
    ),
    ({"structured_outputs": {"regex": "a" * (MAX_GRAMMAR_BYTES + 1)}}, "structured_outputs"),
]


@pytest.mark.parametrize(("extra", "param"), BAD)
@pytest.mark.parametrize("stream", [False, True])
async def test_a_bad_constraint_is_a_400_before_anything_starts(gateway, extra, param, stream):
    response = await gateway.client.post("/v1/chat/completions", json=CHAT | extra | {"stream": stream})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and isinstance(error["code"], str)
    if param is not None:
        assert error["param"] == param, error
    assert gateway.engine.generated == []


async def test_the_engine_reasons_reach_the_caller(gateway):
    response = await gateway.client.post("/v1/completions", json=COMPLETION | BAD[5][0])
    message = response.json()["error"]["message"]
    assert "regex" in message and "parenthesis is not closed" in message, message
    assert "/project/" not in message  # xgrammar's source locations are not the caller's business


async def test_a_schema_nested_too_deep_is_refused_before_it_is_parsed(gateway):
    schema: dict = {"type": "object"}
    for _ in range(MAX_SCHEMA_DEPTH):
        schema = {"type": "object", "properties": {"a": schema}}
    response = await gateway.client.post("/v1/completions", json=COMPLETION | {"structured_outputs": {"json": schema}})
    assert response.status_code == 400
    assert f"deeper than {MAX_SCHEMA_DEPTH}" in response.json()["error"]["message"]


async def test_verdicts_are_cached_by_constraint():
    checker = GrammarChecker()
    good, bad = OutputConstraint(regex="[0-9]+"), OutputConstraint(regex="[0-9")
    for _ in range(2):
        await checker.check(good, "p")
        with pytest.raises(Exception, match="cannot be enforced"):
            await checker.check(bad, "p")
    assert list(checker._verdicts) == [good, bad]


async def test_a_request_cancelled_as_its_compile_slot_frees_ends_cancelled():
    """asyncio.wait_for (3.11) swallowed a cancel that met the slot's acquire: the request ran on
    for a client that had gone. The checker's one slot is held; it frees just as the caller leaves."""
    import asyncio

    checker = GrammarChecker(threads=1)
    await checker.check(OutputConstraint(regex="[0-9]+"), "p")  # loads the grammar check once
    await cancel_as_it_takes_the_slot(checker._slots, checker.check(OutputConstraint(regex="[a-z]+"), "p"))
    await asyncio.wait_for(checker.check(OutputConstraint(regex="[a-z]+"), "p"), 10)  # the slot is free again


@pytest.mark.parametrize(
    ("grammar", "constraint"),
    [
        ({"type": "json", "value": SCHEMA}, OutputConstraint(json_schema=COMPACT)),
        ({"type": "json", "value": json.dumps(SCHEMA)}, OutputConstraint(json_schema=COMPACT)),
        ({"type": "regex", "value": "[a-z]+"}, OutputConstraint(regex="[a-z]+")),
    ],
)
async def test_tgi_grammar_reaches_the_engine(gateway, grammar, constraint):
    response = await gateway.client.post(
        "/generate", json={"inputs": "hi", "parameters": {"adapter_id": "alpha", "grammar": grammar}}
    )
    assert response.status_code == 200, response.text
    assert gateway.engine.constraints == [constraint]


@pytest.mark.parametrize(
    "grammar",
    [
        {"type": "regex", "value": "(ab"},
        {"type": "json", "value": {"type": 5}},
        {"type": "json", "value": "{nope"},
        {"type": "regex", "value": {"a": 1}},
        {"type": "ebnf", "value": "root ::= 'a'"},
    ],
)
@pytest.mark.parametrize("path", ["/generate", "/generate_stream"])
async def test_tgi_bad_grammar_is_a_422_before_anything_starts(gateway, grammar, path):
    response = await gateway.client.post(
        path, json={"inputs": "hi", "parameters": {"adapter_id": "alpha", "grammar": grammar}}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error_type"] == "validation"
    assert gateway.engine.generated == []
