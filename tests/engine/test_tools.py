"""Tool calling on the real engine, with the demo's `weather` adapter: the official openai client's
round trip (streamed and not), the README's example as printed, the OpenAI Agents SDK, and
exactness: `auto` gives PEFT's greedy tokens, a forced call PEFT's under the same grammar's masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from adapters.demo import DEMO_TOOL, DEMO_WEATHER, weather_answer, weather_question
from tests.engine.conftest import ADMIN_KEY
from tests.engine.reference import PeftReference
from tests.engine.test_structured import ConstrainedPeft

pytestmark = pytest.mark.engine

MAX_TOKENS = 48
TOOL = "weather"


@pytest.fixture(scope="module")
def peft(demo) -> ConstrainedPeft:
    return ConstrainedPeft(PeftReference(demo.base, demo.adapters))


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=ADMIN_KEY, max_retries=0)


def prompt_ids(peft: ConstrainedPeft, messages: list[dict]) -> list[int]:
    tokenizer = peft.reference.tokenizer
    text = tokenizer.apply_chat_template(messages, tools=[DEMO_TOOL], add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def ask(city: str) -> list[dict]:
    return [{"role": "user", "content": weather_question(city)}]


@pytest.mark.parametrize("city", list(DEMO_WEATHER))
def test_auto_calls_the_tool_with_peft_greedy_tokens(client, peft, city):
    reply = client.chat.completions.create(
        model=TOOL,
        messages=ask(city),
        tools=[DEMO_TOOL],
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body={"return_token_ids": True},
    )
    choice = reply.choices[0]
    expected = peft.reference._cached(TOOL, tuple(prompt_ids(peft, ask(city))), MAX_TOKENS)
    assert choice.model_extra["token_ids"] == list(expected)
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
        "function",
        "get_weather",
        {"city": city},
    )
    assert choice.message.content is None


def call_streamed(client: openai.OpenAI, messages: list[dict]) -> tuple[list, str | None, str]:
    """The calls, the content and the finish reason, put together from the deltas as a client does."""
    calls: dict[int, dict] = {}
    content, finish_reason = "", None
    stream = client.chat.completions.create(
        model=TOOL, messages=messages, tools=[DEMO_TOOL], temperature=0, max_tokens=MAX_TOKENS, stream=True
    )
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or ():
                if delta.index not in calls:
                    # OpenAI's shape: a call opens with its id, type and name.
                    assert delta.id and delta.type == "function" and delta.function.name
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                calls[delta.index]["arguments"] += delta.function.arguments or ""
            finish_reason = choice.finish_reason or finish_reason
    return list(calls.values()), content, finish_reason


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_openai_client_round_trip(client, stream):
    city = "Tokyo"
    messages = ask(city)
    if stream:
        calls, content, finish_reason = call_streamed(client, messages)
        (call,) = calls
        assert content == ""
        call_id, name, arguments = call["id"], call["name"], call["arguments"]
        assistant = {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}],
        }
    else:
        reply = client.chat.completions.create(model=TOOL, messages=messages, tools=[DEMO_TOOL], temperature=0)
        finish_reason, assistant = reply.choices[0].finish_reason, reply.choices[0].message
        (call,) = assistant.tool_calls
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
    assert finish_reason == "tool_calls"
    assert (name, json.loads(arguments)) == ("get_weather", {"city": city})
    messages += [assistant, {"role": "tool", "tool_call_id": call_id, "content": DEMO_WEATHER[city]}]
    if stream:
        calls, content, finish_reason = call_streamed(client, messages)
        assert (calls, finish_reason) == ([], "stop")
    else:
        reply = client.chat.completions.create(model=TOOL, messages=messages, tools=[DEMO_TOOL], temperature=0)
        content = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop" and not reply.choices[0].message.tool_calls
    assert content == weather_answer(city)


def vllm_schema(tool_choice, parallel_tool_calls=None) -> dict:
    """The schema vLLM's own server forces such a call with."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    request = ChatCompletionRequest(
        model="-", messages=[{"role": "user", "content": "-"}], tools=[DEMO_TOOL], tool_choice=tool_choice
    )
    return get_json_schema_from_tools(request.tool_choice, request.tools, parallel_tool_calls)


FORCED = {
    "named": {"type": "function", "function": {"name": "get_weather"}},
    "required": "required",
}


@pytest.mark.parametrize("model", ["demo", "pirate", TOOL])
@pytest.mark.parametrize("kind", list(FORCED))
def test_forced_calls_match_peft_under_the_same_grammar(client, peft, model, kind):
    city = "Oslo"
    reply = client.chat.completions.create(
        model=model,
        messages=ask(city),
        tools=[DEMO_TOOL],
        tool_choice=FORCED[kind],
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body={"return_token_ids": True},
    )
    choice = reply.choices[0]
    schema = vllm_schema(FORCED[kind], parallel_tool_calls=False)
    adapter = None if model == "demo" else model
    expected = peft.generate(adapter, prompt_ids(peft, ask(city)), peft.json_schema(schema))
    assert choice.model_extra["token_ids"] == expected
    text = peft.text(expected)
    if choice.finish_reason == "length":
        return  # cut short: the arguments are incomplete, and the tokens are what counts
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    arguments = text if kind == "named" else json.dumps(json.loads(text)[0]["parameters"])
    assert json.loads(call.function.arguments) == json.loads(arguments)


def test_forced_call_streams_a_well_formed_call(client):
    stream = client.chat.completions.create(
        model=TOOL,
        messages=ask("Paris"),
        tools=[DEMO_TOOL],
        tool_choice=FORCED["named"],
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    deltas = [delta for chunk in stream for choice in chunk.choices for delta in choice.delta.tool_calls or ()]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert {delta.index for delta in deltas} == {0}


def test_a_named_tool_not_in_tools_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=TOOL,
            messages=ask("Paris"),
            tools=[DEMO_TOOL],
            tool_choice={"type": "function", "function": {"name": "x"}},
        )
    assert refused.value.body["param"] == "tool_choice"


def test_the_readme_example_runs_as_printed(gateway):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Tool calling") :]
    script = section[section.index("python - <<'PY'\n") + len("python - <<'PY'\n") : section.index("\nPY\n")]
    env = {**os.environ, "OPENAI_BASE_URL": f"{gateway.url}/v1", "OPENAI_API_KEY": ADMIN_KEY}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ['tool_calls get_weather {"city": "Paris"}', weather_answer("Paris")]


AGENT = """
import asyncio, json, os, sys
from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
from agents.model_settings import ModelSettings
from openai import AsyncOpenAI

set_tracing_disabled(True)
calls = []

@function_tool
def get_weather(city: str) -> str:
    \"\"\"The weather in a city\"\"\"
    calls.append(city)
    return {"Paris": "sunny, 21 C", "London": "rain, 12 C", "Tokyo": "cloudy, 17 C", "Oslo": "snow, -2 C"}[city]

client = AsyncOpenAI(base_url=os.environ["GATEWAY_URL"], api_key=os.environ["GATEWAY_KEY"])
agent = Agent(
    name="weather",
    instructions=None,
    tools=[get_weather],
    model=OpenAIChatCompletionsModel(model="weather", openai_client=client),
    model_settings=ModelSettings(temperature=0),
)
result = asyncio.run(Runner.run(agent, sys.argv[1]))
print(json.dumps({"calls": calls, "output": result.final_output}))
"""


def test_openai_agents_sdk_calls_the_function_tool(gateway):
    env = {**os.environ, "GATEWAY_URL": f"{gateway.url}/v1", "GATEWAY_KEY": ADMIN_KEY}
    run = subprocess.run(
        [sys.executable, "-c", AGENT, weather_question("London")], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["calls"] == ["London"]
    assert result["output"] == weather_answer("London")
