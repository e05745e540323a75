"""The Responses API on the real engine, through the official openai client and the OpenAI Agents SDK:
each answer equals the chat route's for the same messages (greedy) and PEFT's; a tool round trip on
the demo's `weather` adapter; a json_schema format under PEFT's masks; a stored conversation
continued, listed, deleted and hidden from another tenant; a batch of /v1/responses lines; the
README's examples as printed.

Validation, event order, storage limits and retention run over a FakeEngine in
tests/routes/test_responses.py.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from adapters.demo import DEMO_TOOL, DEMO_WEATHER, weather_answer, weather_question
from tests.engine.conftest import ADMIN_KEY
from tests.engine.reference import PeftReference
from tests.engine.test_structured import MAX_TOKENS as SCHEMA_TOKENS
from tests.engine.test_structured import QUESTION, SCHEMA, ConstrainedPeft, expected

pytestmark = pytest.mark.engine

MAX_TOKENS = 24
TOOL_TOKENS = 48
WEATHER_TOOL = {"type": "function", **DEMO_TOOL["function"]}  # Responses' flat function tool


@pytest.fixture(scope="module")
def peft(demo) -> ConstrainedPeft:
    return ConstrainedPeft(PeftReference(demo.base, demo.adapters))


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=120)


def chat_text(client: openai.OpenAI, model: str, messages: list[dict], max_tokens: int, **extra) -> str:
    reply = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=max_tokens, **extra
    )
    return reply.choices[0].message.content


@pytest.mark.parametrize("model", ["pirate", "poet", "demo"])
def test_create_and_stream_equal_the_chat_route_and_peft(client, peft, model):
    response = client.responses.create(
        model=model, input=QUESTION, temperature=0, max_output_tokens=MAX_TOKENS, store=False
    )
    adapter = None if model == "demo" else model
    reference = peft.reference.chat(adapter, (("user", QUESTION),), MAX_TOKENS)
    assert response.output_text == reference
    assert response.output_text == chat_text(client, model, [{"role": "user", "content": QUESTION}], MAX_TOKENS)
    assert response.status in ("completed", "incomplete") and response.usage.output_tokens > 0

    kinds = []
    with client.responses.stream(
        model=model, input=QUESTION, temperature=0, max_output_tokens=MAX_TOKENS, store=False
    ) as stream:
        deltas = ""
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas += event.delta
        final = stream.get_final_response()
    assert deltas == final.output_text == reference
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] == f"response.{final.status}" and final.usage == response.usage


def test_instructions_are_the_system_message(client):
    response = client.responses.create(
        model="pirate", instructions="Answer briefly.", input=QUESTION, temperature=0, max_output_tokens=12, store=False
    )
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}]
    assert response.output_text == chat_text(client, "pirate", messages, 12)


@pytest.mark.parametrize("city", ["Paris", "Tokyo"])
def test_a_tool_round_trip_on_the_weather_adapter(client, city):
    question = [{"role": "user", "content": weather_question(city)}]
    first = client.responses.create(
        model="weather", input=question, tools=[WEATHER_TOOL], temperature=0, max_output_tokens=TOOL_TOKENS
    )
    (call,) = first.output
    assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "get_weather", {"city": city})
    chat_call = client.chat.completions.create(
        model="weather", messages=question, tools=[DEMO_TOOL], temperature=0, max_tokens=TOOL_TOKENS
    ).choices[0]
    assert chat_call.message.tool_calls[0].function.arguments == call.arguments

    result = {"type": "function_call_output", "call_id": call.call_id, "output": DEMO_WEATHER[city]}
    again = client.responses.create(
        model="weather", input=[*question, call.model_dump(exclude_none=True), result], tools=[WEATHER_TOOL],
        temperature=0, max_output_tokens=TOOL_TOKENS,
    )  # fmt: skip
    assert again.output_text == weather_answer(city)
    continued = client.responses.create(
        model="weather", previous_response_id=first.id, input=[result], tools=[WEATHER_TOOL], temperature=0,
        max_output_tokens=TOOL_TOKENS,
    )  # fmt: skip
    assert continued.output_text == weather_answer(city)
    history = [
        *question,
        {"role": "assistant", "content": None, "tool_calls": [chat_call.message.tool_calls[0].model_dump()]},
        {"role": "tool", "tool_call_id": chat_call.message.tool_calls[0].id, "content": DEMO_WEATHER[city]},
    ]
    assert chat_text(client, "weather", history, TOOL_TOKENS, tools=[DEMO_TOOL]) == weather_answer(city)


def test_a_streamed_tool_call_sends_its_arguments(client):
    with client.responses.stream(
        model="weather", input=weather_question("Oslo"), tools=[WEATHER_TOOL], temperature=0,
        max_output_tokens=TOOL_TOKENS, store=False,
    ) as stream:  # fmt: skip
        arguments = "".join(e.delta for e in stream if e.type == "response.function_call_arguments.delta")
        final = stream.get_final_response()
    (call,) = final.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Oslo"} == json.loads(arguments)


def test_json_schema_format_matches_peft_under_the_same_masks(client, peft):
    ids = list(expected(peft, "pirate", "json", json.dumps(SCHEMA)))
    response = client.responses.create(
        model="pirate", input=QUESTION, temperature=0, max_output_tokens=SCHEMA_TOKENS, store=False,
        text={"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA}},
    )  # fmt: skip
    assert response.output_text == peft.text(ids)
    assert set(json.loads(response.output_text)) == {"ship", "crew"}


def test_a_stored_conversation_is_continued_listed_deleted_and_the_tenants_own(gateway, client):
    admin = client
    keys = [admin.post("/tenants", body={"name": name}, cast_to=object)["api_key"] for name in ("rsp-a", "rsp-b")]
    mine, theirs = (openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0) for key in keys)
    first = mine.responses.create(model="pirate", input=QUESTION, temperature=0, max_output_tokens=MAX_TOKENS)
    follow_up = "Tell me a story."
    second = mine.responses.create(
        model="pirate", input=follow_up, previous_response_id=first.id, temperature=0, max_output_tokens=MAX_TOKENS
    )
    history = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": follow_up},
    ]
    assert second.output_text == chat_text(admin, "pirate", history, MAX_TOKENS)
    assert mine.responses.retrieve(second.id).output_text == second.output_text
    (item,) = mine.responses.input_items.list(second.id).data
    assert item.role == "user" and item.content[0].text == follow_up

    for attempt in (
        lambda: theirs.responses.retrieve(first.id),
        lambda: theirs.responses.input_items.list(first.id),
        lambda: theirs.responses.delete(first.id),
        lambda: theirs.responses.create(model="pirate", input="hi", previous_response_id=first.id),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    mine.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        mine.responses.retrieve(first.id)


AGENT = """
import asyncio, json, os, sys
from agents import Agent, Runner, function_tool, set_default_openai_client, set_tracing_disabled
from agents.model_settings import ModelSettings
from openai import AsyncOpenAI

set_tracing_disabled(True)
set_default_openai_client(AsyncOpenAI(base_url=os.environ["GATEWAY_URL"], api_key=os.environ["GATEWAY_KEY"]))
calls = []

@function_tool
def get_weather(city: str) -> str:
    \"\"\"The weather in a city\"\"\"
    calls.append(city)
    return {"Paris": "sunny, 21 C", "London": "rain, 12 C", "Tokyo": "cloudy, 17 C", "Oslo": "snow, -2 C"}[city]

agent = Agent(name="weather", tools=[get_weather], model="weather", model_settings=ModelSettings(temperature=0))
result = asyncio.run(Runner.run(agent, sys.argv[1]))
ids = [response.response_id for response in result.raw_responses]
print(json.dumps({"calls": calls, "output": result.final_output, "response_ids": ids}))
"""


def test_openai_agents_sdk_default_responses_model_calls_the_function_tool(gateway):
    env = {**os.environ, "GATEWAY_URL": f"{gateway.url}/v1", "GATEWAY_KEY": ADMIN_KEY}
    run = subprocess.run(
        [sys.executable, "-c", AGENT, weather_question("London")], env=env, capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["calls"] == ["London"]
    assert result["output"] == weather_answer("London")
    # the Responses model (the chat completions model reports no response ids): one turn calls, one answers
    assert len(result["response_ids"]) == 2 and all(rid.startswith("resp_") for rid in result["response_ids"])


def test_a_batch_of_responses_lines_answers_as_direct_requests(client):
    models = ("demo", "pirate", "poet", "weather")
    bodies = [
        {"model": models[i % 4], "input": ["Who are you?", "The sea is", "Hello"][i % 3], "temperature": 0,
         "max_output_tokens": 6 + i % 3}
        for i in range(8)
    ]  # fmt: skip
    rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses", "body": b} for i, b in enumerate(bodies)]
    raw = io.BytesIO("".join(json.dumps(row) + "\n" for row in rows).encode())
    upload = client.files.create(file=("responses.jsonl", raw), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/responses", completion_window="24h")
    deadline = time.monotonic() + 240
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.5)
    assert batch.status == "completed" and batch.request_counts.completed == len(rows), batch
    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    by_id = {line["custom_id"]: line["response"]["body"] for line in lines}
    for i, body in enumerate(bodies):
        direct = client.responses.create(**body, store=False)
        answered = by_id[f"r{i}"]
        assert answered["output"][0]["content"][0]["text"] == direct.output_text, body
        assert answered["store"] is False
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(answered["id"])


def test_the_readme_examples_run_as_printed(gateway):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Responses API") :]
    script = section[section.index("python - <<'PY'\n") + len("python - <<'PY'\n") : section.index("\nPY\n")]
    env = {**os.environ, "OPENAI_BASE_URL": f"{gateway.url}/v1", "OPENAI_API_KEY": ADMIN_KEY}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ['function_call get_weather {"city": "Paris"}', weather_answer("Paris")]
    curl = section[section.index("curl ") : section.index("\n```", section.index("curl "))]
    curl = curl.replace("$OPENAI_BASE_URL", f"{gateway.url}/v1").replace("$OPENAI_API_KEY", ADMIN_KEY)
    done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output"][0]["content"][0]["text"]
