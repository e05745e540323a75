"""The web console end to end: headless Chromium against the session's gateway (real engine).

Controls are found by role and label, as a person or a screen reader finds them. With
LORA_GATEWAY_SCREENSHOTS=DIR set, the tests also save the screenshots docs/console.md shows.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from pathlib import Path

import httpx
import pytest
from playwright.async_api import expect

from adapters.demo import DEMO_PROMPT
from tests.engine.conftest import ADMIN_KEY
from tests.engine.reference import PeftReference
from tests.training_data import HYPERPARAMETERS, TRAINING_ROWS, VALIDATION_ROWS, jsonl

pytestmark = pytest.mark.engine

OUTPUT_MS = 60_000  # a generation, with an adapter load, on a busy 2-core machine
JOB_SECONDS = 240
FINISHED = {"succeeded", "failed", "cancelled"}
SCREENSHOTS = os.environ.get("LORA_GATEWAY_SCREENSHOTS")
KEY_SHAPE = re.compile(r"^lgw-[\w-]{20,}$")


@pytest.fixture(scope="module")
def reference(demo) -> PeftReference:
    return PeftReference(demo.base, demo.adapters)


@pytest.fixture
async def api(gateway):
    async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


ADMIN = bearer(ADMIN_KEY)


@pytest.fixture(scope="module", autouse=True)
async def tuning(gateway) -> dict:
    """A tenant's fine-tuning job, started first so that it trains while the other tests run."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
        name, key = await new_tenant(client, "console-ft")
        headers = bearer(key)
        file_ids = []
        for filename, rows in (("train.jsonl", TRAINING_ROWS), ("valid.jsonl", VALIDATION_ROWS)):
            sent = await client.post(
                "/v1/files", data={"purpose": "fine-tune"}, files={"file": (filename, jsonl(rows))}, headers=headers
            )
            assert sent.status_code == 200, sent.text
            file_ids.append(sent.json()["id"])
        body = {
            "model": gateway.base_name,
            "training_file": file_ids[0],
            "validation_file": file_ids[1],
            "suffix": "console",
            "seed": 0,
            "method": {"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS | {"n_epochs": 3}}},
        }
        created = await client.post("/v1/fine_tuning/jobs", json=body, headers=headers)
        assert created.status_code == 200, created.text
        return {"tenant": name, "key": key, "job": created.json()["id"]}


async def snap(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


async def sign_in(page, gateway, key: str) -> None:
    await page.goto(f"{gateway.url}/ui/")
    await page.get_by_label("API key", exact=True).fill(key)
    await page.get_by_role("button", name="Sign in", exact=True).click()
    await expect(page.get_by_role("heading", name="Adapters", exact=True)).to_be_visible()


async def open_tab(page, name: str) -> None:
    await page.get_by_role("navigation", name="Console sections").get_by_role("button", name=name, exact=True).click()


async def new_tenant(api: httpx.AsyncClient, prefix: str) -> tuple[str, str]:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    response = await api.post("/v1/tenants", json={"name": name}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return name, response.json()["api_key"]


async def upload_by_api(api: httpx.AsyncClient, key: str, name: str, folder: Path) -> None:
    files = [("file", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]
    response = await api.post("/v1/adapters", data={"name": name}, files=files, headers=bearer(key))
    assert response.status_code == 201, response.text


def rowheader(page, name: str):
    return page.get_by_role("rowheader", name=name, exact=True)


async def test_sign_in_lists_the_adapters(gateway, page):
    # A browser at / lands on the console.
    await page.goto(f"{gateway.url}/")
    assert page.url == f"{gateway.url}/ui/"
    await page.get_by_label("API key", exact=True).fill("lgw-not-a-key")
    await page.get_by_role("button", name="Sign in", exact=True).click()
    await expect(page.get_by_role("alert").filter(has_text="401")).to_have_text(
        "401 invalid_api_key: the API key is not valid"
    )
    await sign_in(page, gateway, ADMIN_KEY)
    for name in gateway.adapters:
        await expect(rowheader(page, name)).to_be_visible()
    pirate = page.get_by_role("row").filter(has=rowheader(page, "pirate"))
    await expect(pirate.get_by_role("cell", name="shared", exact=True)).to_be_visible()
    await expect(pirate.get_by_role("button", name="Delete pirate", exact=True)).to_be_visible()
    # The key stays in this tab's session storage, never in the URL or a cookie.
    assert ADMIN_KEY not in page.url
    assert await page.context.cookies() == []
    assert await page.evaluate("sessionStorage.getItem('lora-gateway.api-key')") == ADMIN_KEY
    await snap(page, "console-adapters")


async def test_the_playground_streams_what_peft_gives(gateway, page, reference):
    prompt, max_tokens = "The sea is", 16
    await sign_in(page, gateway, ADMIN_KEY)
    await open_tab(page, "Playground")
    await page.get_by_label("Model", exact=True).fill("pirate")
    await page.get_by_label("Run a second model side by side").check()
    await page.get_by_label("Second model", exact=True).fill(gateway.base_name)
    await page.get_by_label("Prompt", exact=True).fill(prompt)
    await page.get_by_label("Max tokens", exact=True).fill(str(max_tokens))
    await page.get_by_label("Temperature", exact=True).fill("0")
    await page.get_by_role("button", name="Run", exact=True).click()
    output, second = page.get_by_label("Output", exact=True), page.get_by_label("Second output", exact=True)
    await expect(output).to_have_text(reference.completion("pirate", prompt, max_tokens), timeout=OUTPUT_MS)
    await expect(second).to_have_text(reference.completion(None, prompt, max_tokens), timeout=OUTPUT_MS)

    # A chat, through the chat template, answers as PEFT does too.
    await page.get_by_label("Endpoint", exact=True).select_option("chat")
    await page.get_by_label("Prompt", exact=True).fill(DEMO_PROMPT)
    await page.get_by_label("Max tokens", exact=True).fill("24")
    await page.get_by_role("button", name="Run", exact=True).click()
    chat_answer = reference.chat("pirate", (("user", DEMO_PROMPT),), 24)
    await expect(output).to_have_text(chat_answer, timeout=OUTPUT_MS)
    await expect(second).to_have_text(reference.chat(None, (("user", DEMO_PROMPT),), 24), timeout=OUTPUT_MS)
    await expect(page.get_by_role("list", name="Chat", exact=True).get_by_role("listitem")).to_contain_text(
        [DEMO_PROMPT]
    )
    await snap(page, "console-playground")


async def test_upload_and_delete_an_adapter(gateway, page, api, tmp_path):
    folder = tmp_path / "poet-copy"
    shutil.copytree(gateway.adapters["poet"], folder)
    name = f"poet-copy-{uuid.uuid4().hex[:6]}"
    await sign_in(page, gateway, ADMIN_KEY)

    # An incomplete adapter: the error shows as the API gives it.
    await page.get_by_label("Adapter name", exact=True).fill(name)
    await page.get_by_label("Adapter files", exact=True).set_input_files([folder / "adapter_config.json"])
    await page.get_by_role("button", name="Upload", exact=True).click()
    refused = await api.post(
        "/v1/adapters",
        data={"name": name},
        files=[("file", ("adapter_config.json", (folder / "adapter_config.json").read_bytes()))],
        headers=ADMIN,
    )
    assert refused.status_code == 400
    error = refused.json()["error"]
    await expect(page.get_by_role("alert").filter(has_text=error["code"])).to_have_text(
        f"400 {error['code']}: {error['message']}"
    )

    await page.get_by_label("Adapter files", exact=True).set_input_files(sorted(folder.iterdir()))
    await page.get_by_role("button", name="Upload", exact=True).click()
    await expect(page.get_by_role("status").filter(has_text="Registered")).to_have_text(f"Registered {name} (rank 16).")
    await expect(rowheader(page, name)).to_be_visible()
    listed = (await api.get(f"/v1/adapters/{name}", headers=ADMIN)).json()
    assert listed["content_hash"] == (await api.get("/v1/adapters/poet", headers=ADMIN)).json()["content_hash"]

    await page.get_by_role("button", name=f"Pin {name}", exact=True).click()
    await expect(page.get_by_role("button", name=f"Unpin {name}", exact=True)).to_be_visible()
    assert (await api.get(f"/v1/adapters/{name}", headers=ADMIN)).json()["pinned"] is True

    await page.get_by_role("button", name=f"Delete {name}", exact=True).click()
    await page.get_by_role("button", name=f"Confirm delete {name}", exact=True).click()
    await expect(rowheader(page, name)).to_have_count(0)
    assert (await api.get(f"/v1/adapters/{name}", headers=ADMIN)).status_code == 404


async def test_a_tenant_sees_only_its_own_adapters_and_usage(gateway, page, api):
    _, own_key = await new_tenant(api, "console-a")
    other, other_key = await new_tenant(api, "console-b")
    await upload_by_api(api, own_key, "own-pirate", gateway.adapters["pirate"])
    await upload_by_api(api, other_key, "other-poet", gateway.adapters["poet"])
    for key, model in ((own_key, "own-pirate"), (other_key, "other-poet")):
        body = {"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        assert (await api.post("/v1/completions", json=body, headers=bearer(key))).status_code == 200

    await sign_in(page, gateway, own_key)
    await expect(rowheader(page, "own-pirate")).to_be_visible()
    for name in gateway.adapters:  # shared with every tenant
        await expect(rowheader(page, name)).to_be_visible()
    await expect(rowheader(page, "other-poet")).to_have_count(0)
    await expect(rowheader(page, f"{other}/other-poet")).to_have_count(0)
    await expect(page.get_by_role("button", name="Tenants", exact=True)).to_be_hidden()

    await open_tab(page, "Usage")
    usage_row = page.get_by_role("row").filter(has=rowheader(page, "own-pirate"))
    await expect(usage_row).to_be_visible()
    await expect(usage_row.get_by_role("img").first).to_be_visible()  # its charts
    await expect(rowheader(page, "other-poet")).to_have_count(0)


async def test_markup_from_the_api_shows_as_text(gateway, page):
    """Adapter and tenant names cannot carry markup; a model name the API echoes back in its error can."""
    markup = '<img src=x onerror="window.injected=1"><b>bold</b>'
    await sign_in(page, gateway, ADMIN_KEY)
    await open_tab(page, "Playground")
    await page.get_by_label("Model", exact=True).fill(markup)
    await page.get_by_label("Prompt", exact=True).fill("<script>window.injected=2</script>")
    await page.get_by_role("button", name="Run", exact=True).click()
    alert = page.get_by_role("alert").filter(has_text="model_not_found")
    await expect(alert).to_have_text(
        f"404 model_not_found: The model '{markup}' does not exist or you do not have access to it."
    )
    assert await alert.locator("img, b").count() == 0
    assert await page.evaluate("window.injected") is None


async def test_the_admin_manages_tenants_and_keys(gateway, page, api):
    name = f"console-t-{uuid.uuid4().hex[:6]}"
    await sign_in(page, gateway, ADMIN_KEY)
    await open_tab(page, "Tenants")
    await page.get_by_label("Tenant name", exact=True).fill(name)
    await page.get_by_label("Max concurrent", exact=True).fill("3")
    await page.get_by_role("button", name="Create tenant", exact=True).click()
    new_key = page.get_by_label("New API key", exact=True)
    await expect(new_key).to_have_text(KEY_SHAPE)  # shown once, in full
    first_key = await new_key.text_content()
    assert (await api.get("/v1/models", headers=bearer(first_key))).status_code == 200
    tenant = (await api.get(f"/v1/tenants/{name}", headers=ADMIN)).json()
    assert tenant["limits"]["max_concurrent"] == 3

    await page.get_by_role("button", name=f"Set limits of {name}", exact=True).click()
    await page.get_by_label("Requests per second", exact=True).fill("7")
    await page.get_by_role("button", name="Save limits", exact=True).click()
    await expect(page.get_by_role("status").filter(has_text="Saved")).to_have_text(f"Saved the limits of {name}.")
    assert (await api.get(f"/v1/tenants/{name}", headers=ADMIN)).json()["limits"]["requests_per_second"] == 7

    await page.get_by_role("button", name=f"Issue a key for {name}", exact=True).click()
    await expect(new_key).not_to_have_text(first_key)
    await expect(new_key).to_have_text(KEY_SHAPE)
    second_key = await new_key.text_content()
    first_id = tenant["keys"][0]["id"]
    await page.get_by_role("button", name=f"Revoke {first_id}", exact=True).click()
    await expect(page.get_by_role("button", name=f"Revoke {first_id}", exact=True)).to_have_count(0)
    assert (await api.get("/v1/models", headers=bearer(first_key))).status_code == 401
    assert (await api.get("/v1/models", headers=bearer(second_key))).status_code == 200
    await page.get_by_role("button", name="Done", exact=True).click()
    await snap(page, "console-tenants")
    body = {"model": "poet", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    assert (await api.post("/v1/completions", json=body, headers=ADMIN)).status_code == 200
    await open_tab(page, "Usage")
    await expect(rowheader(page, "poet")).to_be_visible()
    await snap(page, "console-usage")


async def test_the_fine_tuning_jobs_show_their_status_and_loss(gateway, page, api, tuning):
    key, job_id = tuning["key"], tuning["job"]
    deadline = asyncio.get_running_loop().time() + JOB_SECONDS
    while (job := (await api.get(f"/v1/fine_tuning/jobs/{job_id}", headers=bearer(key))).json())[
        "status"
    ] not in FINISHED:
        assert asyncio.get_running_loop().time() < deadline, f"job still {job['status']} after {JOB_SECONDS} s"
        await asyncio.sleep(0.5)
    assert job["status"] == "succeeded", job
    events, after = [], None
    while True:
        params = {"limit": 100} | ({"after": after} if after else {})
        listing = (await api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params, headers=bearer(key))).json()
        events += listing["data"]
        if not listing["has_more"]:
            break
        after = listing["data"][-1]["id"]
    steps = sorted({e["data"]["step"] for e in events if e["type"] == "metrics"})
    assert steps

    await sign_in(page, gateway, key)
    await open_tab(page, "Fine-tuning")
    row = page.get_by_role("row").filter(has=rowheader(page, job_id))
    await expect(row.get_by_role("cell", name="succeeded", exact=True)).to_be_visible()
    await expect(row.get_by_role("cell", name=job["fine_tuned_model"], exact=True)).to_be_visible()
    await row.get_by_role("button", name=f"Loss curve of {job_id}", exact=True).click()
    chart = page.get_by_role("img", name=re.compile(f"^training loss over {len(steps)} steps, last "))
    await expect(chart).to_be_visible()
    await expect(page.get_by_text(f"Step {steps[-1]}: training loss")).to_contain_text("validation")
    await snap(page, "console-fine-tuning")
