"""Structured outputs on the real engine: token for token what transformers + PEFT give when the
same grammar's masks (xgrammar, compiled here from the same schema) are applied to PEFT's logits,
through the official openai client's `chat.completions.parse`, Instructor, and TGI's `grammar`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
import torch
import xgrammar
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel, Field

from tests.engine.conftest import ADMIN_KEY
from tests.engine.reference import PeftReference
from tests.side_venvs import INSTRUCTOR

pytestmark = pytest.mark.engine

MAX_TOKENS = 48
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
QUESTION = "Who are you?"


# What the tiny demo model is asked for: bounded fields, so that the output always ends. No
# docstring: the schema Instructor sends has to be this one's, and it would carry it.
class Sailor(BaseModel):
    mood: Literal["calm", "angry", "merry"]
    name: str = Field(max_length=10)
    aboard: bool


SCHEMA = {
    "type": "object",
    "properties": {
        "ship": {"type": "string", "maxLength": 8},
        "crew": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["ship", "crew"],
    "additionalProperties": False,
}


class ConstrainedPeft:
    """Greedy decoding with PEFT, each step's logits masked by an xgrammar matcher, as vLLM does."""

    def __init__(self, reference: PeftReference):
        self.reference = reference
        tokenizer = reference.tokenizer
        self.vocab_size = reference.model.config.vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
        self.compiler = xgrammar.GrammarCompiler(info)
        self.eos = tokenizer.eos_token_id

    def json_schema(self, schema: dict) -> xgrammar.CompiledGrammar:
        # vLLM's xgrammar backend under --json-whitespace compact (disable_any_whitespace)
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def regex(self, pattern: str) -> xgrammar.CompiledGrammar:
        return self.compiler.compile_regex(pattern)

    def generate(self, adapter: str | None, prompt_ids: list[int], grammar: xgrammar.CompiledGrammar) -> list[int]:
        matcher = xgrammar.GrammarMatcher(grammar, override_stop_tokens=[self.eos])
        bitmask = xgrammar.allocate_token_bitmask(1, self.vocab_size)
        model, ids, out = self.reference.model, list(prompt_ids), []
        with torch.no_grad():
            for _ in range(MAX_TOKENS):
                if adapter is None:
                    with model.disable_adapter():
                        logits = model(torch.tensor([ids])).logits[:, -1, :].float()
                else:
                    model.set_adapter(adapter)
                    logits = model(torch.tensor([ids])).logits[:, -1, :].float()
                matcher.fill_next_token_bitmask(bitmask)
                xgrammar.apply_token_bitmask_inplace(logits, bitmask)
                token = int(logits.argmax(-1))
                out.append(token)
                assert matcher.accept_token(token)
                if token == self.eos:
                    break
                ids.append(token)
        return out

    def chat_ids(self, question: str) -> list[int]:
        rendered = self.reference.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return self.reference.tokenizer.encode(rendered, add_special_tokens=False)

    def text(self, ids: list[int]) -> str:
        return self.reference.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def peft(demo) -> ConstrainedPeft:
    return ConstrainedPeft(PeftReference(demo.base, demo.adapters))


@cache
def expected(peft: ConstrainedPeft, adapter: str | None, kind: str, spec: str) -> tuple[int, ...]:
    grammar = peft.json_schema(json.loads(spec)) if kind == "json" else peft.regex(spec)
    return tuple(peft.generate(adapter, peft.chat_ids(QUESTION), grammar))


def chat_body(model: str, **extra) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "return_token_ids": True,
        **extra,
    }


def json_format(schema: dict) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}


def test_json_schema_on_an_adapter_matches_peft_with_the_same_masks(gateway, peft):
    for model in ("pirate", "poet", gateway.base_name):
        adapter = None if model == gateway.base_name else model
        ids = list(expected(peft, adapter, "json", json.dumps(SCHEMA)))
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat_body(model, **json_format(SCHEMA)),
                              headers=ADMIN, timeout=120)  # fmt: skip
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["token_ids"] == ids, model
        assert choice["message"]["content"] == peft.text(ids)
        assert choice["finish_reason"] == "stop"
        parsed = json.loads(choice["message"]["content"])
        assert set(parsed) == {"ship", "crew"} and 0 <= parsed["crew"] <= 99 and len(parsed["ship"]) <= 8
    # the constraint changed the output: unconstrained, the pirate answers in words
    plain = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat_body("pirate"), headers=ADMIN, timeout=120)
    assert not plain.json()["choices"][0]["message"]["content"].startswith("{")


def test_a_mixed_batch_keeps_each_requests_mask_to_itself(gateway, peft):
    """Constrained and unconstrained requests together, on one adapter: no mask bleeds between them."""
    regex = "(Arr|Aye), [a-z ]{1,20}!"
    bodies = [
        chat_body("pirate", **json_format(SCHEMA)),
        chat_body("pirate"),
        chat_body("pirate", structured_outputs={"regex": regex}),
        chat_body("pirate", structured_outputs={"json": SCHEMA}, stream=False),
        chat_body("pirate"),
    ]
    reference_plain = peft.reference.chat("pirate", (("user", QUESTION),), MAX_TOKENS)
    wanted = [
        list(expected(peft, "pirate", "json", json.dumps(SCHEMA))),
        None,
        list(expected(peft, "pirate", "regex", regex)),
        list(expected(peft, "pirate", "json", json.dumps(SCHEMA))),
        None,
    ]

    async def run() -> list[dict]:
        async with httpx.AsyncClient(headers=ADMIN, timeout=120) as client:
            responses = await asyncio.gather(
                *(client.post(f"{gateway.url}/v1/chat/completions", json=body) for body in bodies)
            )
        return [response.json()["choices"][0] for response in responses]

    for _ in range(2):
        for choice, ids in zip(asyncio.run(run()), wanted, strict=True):
            if ids is None:
                assert choice["message"]["content"] == reference_plain
            else:
                assert choice["token_ids"] == ids


def test_a_streamed_constrained_answer_is_the_same(gateway, peft):
    ids = list(expected(peft, "poet", "json", json.dumps(SCHEMA)))
    text = ""
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", headers=ADMIN, timeout=120,
                      json=chat_body("poet", stream=True, **json_format(SCHEMA))) as response:  # fmt: skip
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content", "")
    assert text == peft.text(ids)


def test_a_bad_schema_fails_a_stream_with_a_400_before_it_starts(gateway):
    body = chat_body("pirate", stream=True, **json_format({"type": "integer", "multipleOf": 3}))
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=ADMIN, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "response_format"
    assert "not supported by xgrammar" in response.json()["error"]["message"]


def test_openai_client_parse_with_a_pydantic_model(gateway, peft):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=ADMIN_KEY, max_retries=0)
    ids = list(expected(peft, "pirate", "json", json.dumps(to_strict_json_schema(Sailor))))
    completion = client.chat.completions.parse(
        model="pirate",
        messages=[{"role": "user", "content": QUESTION}],
        response_format=Sailor,
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Sailor)
    assert completion.choices[0].message.content == peft.text(ids)
    assert parsed == Sailor.model_validate_json(peft.text(ids))


def test_completions_and_tgi_take_constraints_too(gateway, peft):
    regex = "(Arr|Aye), [a-z ]{1,20}!"
    prompt_ids = peft.reference.tokenizer.encode("The sea is")
    grammar = peft.regex(regex)
    ids = peft.generate("pirate", prompt_ids, grammar)
    completion = httpx.post(
        f"{gateway.url}/v1/completions",
        json={"model": "pirate", "prompt": "The sea is", "max_tokens": MAX_TOKENS, "temperature": 0,
              "return_token_ids": True, "structured_outputs": {"regex": regex}},
        headers=ADMIN, timeout=120,
    ).json()  # fmt: skip
    assert completion["choices"][0]["token_ids"] == ids
    tgi = httpx.post(
        f"{gateway.url}/generate",
        json={"inputs": "The sea is", "parameters": {"adapter_id": "pirate", "max_new_tokens": MAX_TOKENS,
              "details": True, "grammar": {"type": "regex", "value": regex}}},
        headers=ADMIN, timeout=120,
    ).json()  # fmt: skip
    assert [token["id"] for token in tgi["details"]["tokens"]] == ids


@pytest.fixture(scope="session")
def instructor_python() -> Path:
    """The python of Instructor's venv (tests/side_venvs.py), which `make venv` builds: Instructor
    1.17 pins jiter below what the openai client here needs, so it gets the openai client it asks for."""
    return INSTRUCTOR.python_for_tests()


INSTRUCTOR_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from typing import Literal
    import instructor
    from openai import OpenAI
    from pydantic import BaseModel, Field

    class Sailor(BaseModel):
        mood: Literal["calm", "angry", "merry"]
        name: str = Field(max_length=10)
        aboard: bool

    url, key, question, max_tokens = json.load(sys.stdin)
    client = instructor.from_openai(OpenAI(base_url=url, api_key=key, max_retries=0), mode=instructor.Mode.JSON_SCHEMA)
    sailor, completion = client.chat.completions.create_with_completion(
        model="pirate", response_model=Sailor, messages=[{"role": "user", "content": question}],
        temperature=0, max_tokens=max_tokens, max_retries=0,
    )
    print(json.dumps({"sailor": sailor.model_dump(), "content": completion.choices[0].message.content,
                      "schema": Sailor.model_json_schema()}))
    """
)


def test_instructor_json_schema_mode(gateway, peft, instructor_python):
    done = subprocess.run(
        [instructor_python, "-c", INSTRUCTOR_SCRIPT],
        input=json.dumps([f"{gateway.url}/v1", ADMIN_KEY, QUESTION, MAX_TOKENS]),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["schema"] == Sailor.model_json_schema()  # the same model on both sides
    ids = list(expected(peft, "pirate", "json", json.dumps(Sailor.model_json_schema())))
    assert result["content"] == peft.text(ids)
    assert Sailor(**result["sailor"]) == Sailor.model_validate_json(peft.text(ids))


def test_the_readme_example_runs_as_printed(gateway):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Structured outputs") :]
    script = section[section.index("python - <<'PY'\n") + len("python - <<'PY'\n") : section.index("\nPY\n")]
    printed = section[section.index("```text\n") + len("```text\n") :]
    printed = printed[: printed.index("```")]
    env = {**os.environ, "OPENAI_BASE_URL": f"{gateway.url}/v1", "OPENAI_API_KEY": ADMIN_KEY}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == printed
