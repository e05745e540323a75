"""TGI's and LoRAX's API on the real engine, through huggingface_hub's InferenceClient and lorax-client.

lorax-client 0.6.3 pins huggingface_hub below what transformers and vLLM need here, so it runs in
a venv of its own (`lorax_python`, tests/side_venvs.py), which `make venv` builds from PyPI.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import httpx
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError, UnknownError, ValidationError

from tests.engine.conftest import ADMIN_KEY
from tests.engine.reference import PeftReference
from tests.side_venvs import LORAX

pytestmark = pytest.mark.engine

MAX_TOKENS = 16
PROMPTS = ["The old captain said", "A sailor"]  # each model answers them differently, and at length
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def reference(demo) -> PeftReference:
    return PeftReference(demo.base, demo.adapters)


@pytest.fixture(scope="session")
def lorax_python() -> Path:
    """The python of lorax-client's venv (tests/side_venvs.py), which `make venv` builds."""
    return LORAX.python_for_tests()


# Runs in lorax-client's venv: each call of a JSON list on stdin, one JSON result per call on stdout.
LORAX_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from lorax import Client, MergedAdapters
    url, key, calls = json.load(sys.stdin)
    client = Client(url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    results = []
    for call in calls:
        kwargs = dict(call["kwargs"])
        if "merged_adapters" in kwargs:
            kwargs["merged_adapters"] = MergedAdapters(**kwargs["merged_adapters"])
        try:
            if call["stream"]:
                events = list(client.generate_stream(call["prompt"], **kwargs))
                results.append({
                    "ids": [e.token.id for e in events],
                    "text": "".join(e.token.text for e in events if not e.token.special),
                    "generated_text": events[-1].generated_text,
                    "finish_reason": events[-1].details.finish_reason.value,
                })
            else:
                response = client.generate(call["prompt"], **kwargs)
                details = response.details
                results.append({
                    "ids": [t.id for t in details.tokens],
                    "generated_text": response.generated_text,
                    "finish_reason": details.finish_reason.value,
                    "prompt_tokens": details.prompt_tokens,
                    "prefill": [t.id for t in details.prefill],
                })
        except Exception as exc:
            results.append({"error": type(exc).__name__, "message": str(exc)})
    print(json.dumps(results))
    """
)


def lorax(python: Path, url: str, calls: list[dict], key: str = ADMIN_KEY) -> list[dict]:
    """Run lorax-client calls ({prompt, stream, kwargs}) against `url`, all in one process."""
    done = subprocess.run(
        [python, "-c", LORAX_SCRIPT], input=json.dumps([url, key, calls]), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def call(prompt: str, stream: bool = False, **kwargs) -> dict:
    return {"prompt": prompt, "stream": stream, "kwargs": {"max_new_tokens": MAX_TOKENS, **kwargs}}


def expected(reference: PeftReference, adapter: str | None, prompt: str) -> tuple[str, list[int]]:
    return reference.completion(adapter, prompt, MAX_TOKENS), reference.completion_ids(adapter, prompt, MAX_TOKENS)


def test_inference_client_matches_peft_plain_streamed_and_with_details(gateway, reference):
    client = InferenceClient(model=gateway.url, token=ADMIN_KEY, timeout=120)
    for adapter in (None, "pirate", "poet"):
        for prompt in PROMPTS:
            text, ids = expected(reference, adapter, prompt)
            case = (adapter, prompt)
            assert client.text_generation(prompt, adapter_id=adapter, max_new_tokens=MAX_TOKENS) == text, case
            detailed = client.text_generation(
                prompt, adapter_id=adapter, max_new_tokens=MAX_TOKENS, details=True, decoder_input_details=True
            )
            assert detailed.generated_text == text, case
            assert [t.id for t in detailed.details.tokens] == ids, case
            assert [t.id for t in detailed.details.prefill] == reference.tokenizer.encode(prompt)
            assert detailed.details.prefill[0].logprob is None
            assert all(t.logprob is not None and t.logprob <= 0 for t in detailed.details.tokens)
            assert detailed.details.seed is None  # greedy
            finish = "eos_token" if ids[-1] == reference.tokenizer.eos_token_id else "length"
            assert detailed.details.finish_reason == finish, case
            events = list(
                client.text_generation(prompt, adapter_id=adapter, max_new_tokens=MAX_TOKENS, stream=True, details=True)
            )
            assert [e.token.id for e in events] == ids, case
            assert "".join(e.token.text for e in events if not e.token.special) == text, case
            assert events[-1].generated_text == text and events[-1].details.generated_tokens == len(ids)
    # the adapters answer differently from the base model, so the comparisons above tell them apart
    assert len({expected(reference, a, PROMPTS[0])[0] for a in (None, "pirate", "poet")}) == 3


def test_lorax_client_matches_peft(gateway, reference, lorax_python):
    calls = []
    for adapter in (None, "pirate", "poet"):
        calls += [
            call(PROMPTS[1], adapter_id=adapter, decoder_input_details=True),
            call(PROMPTS[1], True, adapter_id=adapter),
        ]
    results = lorax(lorax_python, gateway.url, calls)
    for adapter, (plain, streamed) in zip(
        (None, "pirate", "poet"), zip(results[::2], results[1::2], strict=True), strict=True
    ):
        text, ids = expected(reference, adapter, PROMPTS[1])
        assert plain["generated_text"] == text and plain["ids"] == ids, (adapter, plain)
        assert plain["prefill"] == reference.tokenizer.encode(PROMPTS[1])
        assert plain["prompt_tokens"] == len(plain["prefill"])
        assert streamed["ids"] == ids and streamed["generated_text"] == streamed["text"] == text, (adapter, streamed)


def test_merged_adapters_answer_as_the_registered_composition(gateway, reference, lorax_python):
    url = gateway.url
    # The demo's adapters have ranks 8 and 16; LoRAX's strategies need one rank, so first an svd to 8.
    made = []
    try:
        for name, compose in (
            ("tgi-pp8", {"adapters": ["pirate", "poet"], "weights": [0.8, 0.6], "method": "svd", "rank": 8}),
            ("tgi-ties", {"adapters": ["pirate", "tgi-pp8"], "weights": [0.9, 0.6], "method": "ties", "density": 0.5}),
            ("tgi-linear", {"adapters": ["pirate", "tgi-pp8"], "weights": [0.7, 0.5], "method": "linear"}),
        ):
            response = httpx.post(
                f"{url}/v1/adapters", json={"name": name, "compose": compose}, headers=ADMIN, timeout=60
            )
            assert response.status_code == 201, response.text
            made.append(name)
        merges = {
            "tgi-ties": {"ids": ["pirate", "tgi-pp8"], "weights": [0.9, 0.6], "merge_strategy": "ties", "density": 0.5},
            "tgi-linear": {
                "ids": ["pirate", "tgi-pp8"],
                "weights": [0.7, 0.5],
                "merge_strategy": "linear",
                "density": 1.0,
            },
        }
        calls = []
        for registered, merge in merges.items():
            calls += [call(p, adapter_id=registered) for p in PROMPTS]
            calls += [call(p, merged_adapters=merge) for p in PROMPTS]
            calls += [call(PROMPTS[0], True, merged_adapters=merge)]
        results = lorax(lorax_python, url, calls)
        pirate = [expected(reference, "pirate", p)[1] for p in PROMPTS]
        for i, registered in enumerate(merges):
            chunk = results[i * 5 : (i + 1) * 5]
            assert all("error" not in r for r in chunk), chunk
            as_registered, as_merged, streamed = chunk[:2], chunk[2:4], chunk[4]
            assert [r["ids"] for r in as_merged] == [r["ids"] for r in as_registered], registered
            assert streamed["ids"] == as_registered[0]["ids"]
            assert [r["ids"] for r in as_registered] != pirate, registered  # a composition, not its first input
        # the second request of a recipe reused the first's composition: two compositions for two recipes
        log = gateway.log_path.read_text()
        assert log.count("composed merged adapter merged-") == 2, log[-3000:]
    finally:
        for name in reversed(made):
            httpx.delete(f"{url}/v1/adapters/{name}", headers=ADMIN, timeout=30)


def test_refusals_reach_the_clients_as_their_errors(gateway, demo, lorax_python):
    url = gateway.url
    client = InferenceClient(model=url, token=ADMIN_KEY, timeout=60)
    with pytest.raises(ValidationError, match="typical_p"):
        client.text_generation("hi", typical_p=0.5, max_new_tokens=2)
    with pytest.raises(ValidationError, match="watermark"):
        client.text_generation("hi", watermark=True, max_new_tokens=2)
    with pytest.raises(UnknownError, match="'no-such-adapter' does not exist") as missing:
        client.text_generation("hi", adapter_id="no-such-adapter", max_new_tokens=2)
    assert isinstance(missing.value.__cause__, HfHubHTTPError) and missing.value.__cause__.response.status_code == 404
    # a tenant's adapter is another tenant's missing one
    tenants = {}
    try:
        for tenant in ("tgi-a", "tgi-b"):
            response = httpx.post(f"{url}/v1/tenants", json={"name": tenant}, headers=ADMIN, timeout=30)
            assert response.status_code == 201, response.text
            tenants[tenant] = response.json()["api_key"]
        body = {"name": "tgi-private", "path": str(demo.adapters["poet"]), "owner": "tgi-a"}
        assert httpx.post(f"{url}/v1/adapters", json=body, headers=ADMIN, timeout=60).status_code == 201
        merge = {"ids": ["tgi-private", "poet"], "weights": [1, 1], "merge_strategy": "linear", "density": 0}
        results = lorax(
            lorax_python,
            url,
            [
                call("hi", adapter_id="tgi-private"),
                call("hi", adapter_id="tgi-ghost"),
                call("hi", merged_adapters=merge),
                call("hi", adapter_id="poet", adapter_source="hub"),
                call("hi", adapter_id="poet", max_new_tokens=10**6),
            ],
            key=tenants["tgi-b"],
        )
        private, ghost, merged, hub, too_long = results
        assert private["error"] == ghost["error"] == merged["error"] == "NotFoundError", results
        assert private["message"] == ghost["message"].replace("tgi-ghost", "tgi-private")
        assert hub["error"] == "ValidationError" and "register the adapter first" in hub["message"], hub
        assert too_long["error"] == "ValidationError" and "max_new_tokens" in too_long["message"], too_long
        # the owner may use it
        assert "error" not in lorax(lorax_python, url, [call("hi", adapter_id="tgi-private")], key=tenants["tgi-a"])[0]
    finally:
        httpx.delete(f"{url}/v1/adapters/tgi-a/tgi-private", headers=ADMIN, timeout=30)
        for tenant in tenants:
            httpx.delete(f"{url}/v1/tenants/{tenant}", headers=ADMIN, timeout=30)
    info = httpx.get(f"{url}/info", timeout=10).json()
    assert info["model_id"] == "demo" and info["max_total_tokens"] > info["max_input_tokens"]
    assert httpx.get(f"{url}/ping", timeout=10).status_code == 200
