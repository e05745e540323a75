from __future__ import annotations


async def test_models_lists_base_and_adapters_with_parent(gateway):
    response = await gateway.client.get("/v1/models")
    assert response.status_code == 200
    cards = {card["id"]: card for card in response.json()["data"]}
    assert set(cards) == {"base", "alpha", "beta"}
    assert cards["base"]["parent"] is None
    assert cards["alpha"]["parent"] == "base" and cards["beta"]["parent"] == "base"
    assert all("/" not in card["root"] for card in cards.values())  # no server paths


async def test_model_by_name(gateway):
    assert (await gateway.client.get("/v1/models/alpha")).json()["parent"] == "base"
    missing = await gateway.client.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


async def test_health_and_ready(gateway):
    assert (await gateway.client.get("/health")).json() == {"status": "ok"}
    ready = await gateway.client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def test_unknown_route_and_method_use_the_error_shape(gateway):
    missing = await gateway.client.get("/v1/nothing")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    wrong = await gateway.client.get("/v1/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
