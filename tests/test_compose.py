"""Composition: the math against PEFT's add_weighted_adapter, refusals, and POST /v1/adapters {compose}."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adapters.compose import Recipe, _combine, compose
from adapters.errors import InvalidComposition
from adapters.validate import validate_adapter
from tests.adapter_files import TINY_BASE, TINY_CONFIG, make_adapter
from tests.routes.test_tenancy import new_tenant, upload

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.imports("peft")]

# name -> (rank, targets, seed): mixed ranks and targets, and two of one rank for PEFT's methods.
INPUTS = {
    "a": (8, ("q_proj", "v_proj"), 1),
    "b": (8, ("q_proj", "o_proj", "up_proj"), 2),
    "c": (4, ("q_proj", "v_proj", "down_proj"), 3),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return {
        name: make_adapter(root / name, rank=rank, targets=targets, seed=seed)
        for name, (rank, targets, seed) in INPUTS.items()
    }


@pytest.fixture(scope="module")
def peft_model(folders):
    """A tiny Llama of TINY_BASE's shapes with every input loaded in PEFT."""
    # Imported here, not at module level, where every xdist worker paid their 5-7 s while collecting.
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINY_CONFIG, vocab_size=32)
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(LlamaForCausalLM(config).eval(), folders["a"], adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(folders[name], adapter_name=name)
    return model


def peft_deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    return {
        key.removeprefix("base_model.model."): module.get_delta_weight(adapter)
        for key, module in model.named_modules()
        if hasattr(module, "lora_A") and adapter in module.lora_A
    }


def folder_deltas(folder) -> dict[str, torch.Tensor]:
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    scaling = config["lora_alpha"] / config["r"]
    return {
        name.removesuffix(".lora_A.weight").removeprefix("base_model.model."): scaling
        * tensors[name.replace("lora_A", "lora_B")]
        @ tensors[name]
        for name in tensors
        if name.endswith("lora_A.weight")
    }


def assert_same_deltas(got: dict, want: dict, tolerance: float) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        scale = want[key].abs().max().item()
        assert (got[key] - want[key]).abs().max().item() <= tolerance * scale, key


PEFT_CASES = [
    ("cat", ["a", "b", "c"], [0.7, -0.4, 1.3], {}, {}),
    ("svd-full", ["a", "b", "c"], [0.7, -0.4, 1.3], {"svd_rank": 20}, {}),
    ("svd-truncated", ["a", "b", "c"], [0.7, -0.4, 1.3], {"svd_rank": 6}, {"rank": 6}),
    ("linear", ["a", "b"], [0.7, -0.4], {}, {}),
    ("ties", ["a", "b"], [0.7, 0.4], {"density": 0.5}, {"density": 0.5}),
    (
        "ties-frequency",
        ["a", "b"],
        [0.7, 0.4],
        {"density": 0.3, "majority_sign_method": "frequency"},
        {"density": 0.3, "majority_sign_method": "frequency"},
    ),
]


@pytest.mark.parametrize(
    ("case", "names", "weights", "peft_kwargs", "ours"), PEFT_CASES, ids=[c[0] for c in PEFT_CASES]
)
def test_deltas_match_peft_add_weighted_adapter(peft_model, folders, tmp_path, case, names, weights, peft_kwargs, ours):
    method = case.split("-")[0]
    peft_model.add_weighted_adapter(names, weights, case, combination_type=method, **peft_kwargs)
    result = compose([folders[n] for n in names], Recipe.of(method, weights, **ours), tmp_path / "out", max_rank=64)
    # float32 throughout; svd decomposes a smaller matrix than PEFT, so its rounding differs a little.
    assert_same_deltas(folder_deltas(tmp_path / "out"), peft_deltas(peft_model, case), 1e-5)
    spec = validate_adapter(tmp_path / "out", TINY_BASE, max_rank=64)  # a normal adapter for the same base
    assert spec.rank == result.rank == json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_alpha"]
    assert result.target_modules == tuple(sorted({t for n in names for t in INPUTS[n][1]}))
    if method == "cat" or case == "svd-full":
        assert result.exact and result.relative_error < 1e-5
        assert result.rank == sum(INPUTS[n][0] for n in names)
    else:
        assert not result.exact and result.relative_error > 0.05  # approximations, and the error says how far


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_draws_as_peft_does_from_the_seed(method):
    from peft.utils.merge_utils import dare_linear, dare_ties

    tensors = [torch.randn(8, 64), torch.randn(8, 64)]
    weights = torch.tensor([0.7, 0.4])
    torch.manual_seed(11)
    want = dare_linear(tensors, weights, 0.5) if method == "dare_linear" else dare_ties(tensors, weights, 0.5, "total")
    recipe = Recipe.of(method, [0.7, 0.4], density=0.5, seed=11)
    got = _combine(tensors, weights, method, recipe, torch.Generator().manual_seed(11))
    assert torch.equal(got, want)


def test_dare_is_reproducible_by_seed(folders, tmp_path):
    def weights_of(seed, out):
        compose(
            [folders["a"], folders["b"]], Recipe.of("dare_ties", [0.5, 0.5], density=0.4, seed=seed), out, max_rank=64
        )
        return (out / "adapter_model.safetensors").read_bytes()

    assert weights_of(3, tmp_path / "x") == weights_of(3, tmp_path / "y") != weights_of(4, tmp_path / "z")


@pytest.mark.parametrize("method", ["cat", "svd", "linear", "ties", "dare_linear"])
def test_one_adapter_with_weight_one_is_itself(folders, tmp_path, method):
    extra = {"density": 0.5} if method in ("ties", "dare_linear") else {}
    result = compose([folders["b"]], Recipe.of(method, [1.0], **extra), tmp_path / "out", max_rank=64)
    assert result.exact and result.rank == 8
    assert_same_deltas(folder_deltas(tmp_path / "out"), folder_deltas(folders["b"]), 1e-6)


def test_recipe_cache_key_names_recipe_and_inputs():
    recipe = Recipe.of("svd", [0.5, 0.5], rank=8)
    key = recipe.cache_key(["h1", "h2"])
    assert key == Recipe.of("svd", [0.5, 0.5], rank=8).cache_key(["h1", "h2"])
    assert len({key, recipe.cache_key(["h2", "h1"]), Recipe.of("svd", [0.5, 0.6], rank=8).cache_key(["h1", "h2"])}) == 3
    assert Recipe.of("dare_linear", [1.0], density=0.5).seed == 0  # filled in, so the key pins the draws


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"method": "mean", "weights": [1]}, "not one of cat, svd"),
        ({"method": "cat", "weights": []}, "1 to 16 adapters"),
        ({"method": "cat", "weights": [float("nan")]}, "finite"),
        ({"method": "ties", "weights": [1, 1]}, "needs 'density'"),
        ({"method": "ties", "weights": [1, 1], "density": 1.5}, "in (0, 1]"),
        ({"method": "cat", "weights": [1], "density": 0.5}, "'density' applies to method ties"),
        ({"method": "cat", "weights": [1], "rank": 8}, "'rank' applies to method svd only"),
        ({"method": "linear", "weights": [1], "seed": 1}, "'seed' applies to method dare_linear"),
        ({"method": "ties", "weights": [1], "density": 0.5, "majority_sign_method": "max"}, "total or frequency"),
    ],
)
def test_bad_recipes_say_what_is_wrong(kwargs, phrase):
    with pytest.raises(InvalidComposition, match=None) as raised:
        Recipe.of(kwargs.pop("method"), kwargs.pop("weights"), **kwargs)
    assert phrase in raised.value.message


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        ({"use_rslora": True}, "rsLoRA"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "lora_only"}, "trained biases"),
        ({"lora_bias": True}, "trained biases"),
    ],
)
def test_inputs_peft_composes_wrongly_are_refused(folders, tmp_path, overrides, phrase):
    odd = make_adapter(tmp_path / "odd", config_overrides=overrides)
    with pytest.raises(InvalidComposition) as raised:
        compose([folders["a"], odd], Recipe.of("cat", [1, 1]), tmp_path / "out", max_rank=64, names=["a", "odd"])
    assert phrase in raised.value.message and "odd" in raised.value.message
    assert not (tmp_path / "out").exists()


def test_ranks_past_the_limit_or_mismatched_are_refused(folders, tmp_path):
    inputs = [folders["a"], folders["c"]]
    with pytest.raises(InvalidComposition) as raised:
        compose(inputs, Recipe.of("cat", [1, 1]), tmp_path / "out", max_rank=8, names=["a", "c"])
    assert raised.value.message == (
        "cat gives rank 12 (8 + 4), above --max-lora-rank 8; use method svd with a rank of at most 8"
    )
    with pytest.raises(InvalidComposition, match="rank 16 is above --max-lora-rank 8"):
        compose(inputs, Recipe.of("svd", [1, 1], rank=16), tmp_path / "out", max_rank=8)
    with pytest.raises(InvalidComposition) as raised:
        compose(inputs, Recipe.of("linear", [1, 1]), tmp_path / "out", max_rank=64, names=["a", "c"])
    assert "needs adapters of one rank (a has 8, c has 4)" in raised.value.message
    # svd without a rank: the exact one when it fits, else the largest allowed
    assert compose(inputs, Recipe.of("svd", [1, 1]), tmp_path / "fits", max_rank=16).rank == 12
    truncated = compose(inputs, Recipe.of("svd", [1, 1]), tmp_path / "cut", max_rank=8)
    assert truncated.rank == 8 and not truncated.exact


# -- POST /v1/adapters {"name", "compose"} ---------------------------------------------------------


async def register_path(gw, name, folder):
    response = await gw.client.post("/v1/adapters", json={"name": name, "path": str(folder)}, headers=gw.admin)
    assert response.status_code == 201, response.text


async def compose_request(gw, name, headers, **spec):
    return await gw.client.post("/v1/adapters", json={"name": name, "compose": spec}, headers=headers)


async def test_compose_registers_a_served_adapter(full, folders, tmp_path):
    await register_path(full, "a", folders["a"])
    await register_path(full, "c", folders["c"])
    response = await compose_request(full, "mix", full.admin, adapters=["a", "c"], weights=[0.5, 2.0])
    assert response.status_code == 201, response.text
    card = response.json()
    assert (card["name"], card["rank"], card["state"]) == ("mix", 12, "registered")  # loaded on first use
    assert card["composition"].pop("relative_error") < 1e-6
    assert card["composition"] == {
        "method": "cat",
        "adapters": ["a", "c"],
        "weights": [0.5, 2.0],
        "rank": 12,
        "exact": True,
    }
    entry = full.registry.find("", "mix")
    exact = {k: 0.5 * v for k, v in folder_deltas(folders["a"]).items()}
    for key, delta in folder_deltas(folders["c"]).items():
        exact[key] = exact.get(key, 0) + 2.0 * delta
    assert_same_deltas(folder_deltas(entry.spec.path), exact, 1e-6)
    completion = await full.client.post(
        "/v1/completions", json={"model": "mix", "prompt": "hi", "max_tokens": 1}, headers=full.admin
    )
    assert completion.json()["choices"][0]["text"] == "mix-0 "
    assert entry.adapter_id in full.engine.added  # loaded on that first request
    # a composed adapter composes again, and svd brings it down to a rank
    again = await compose_request(full, "mix4", full.admin, adapters=["mix"], method="svd", rank=4)
    assert again.status_code == 201 and again.json()["rank"] == 4 and again.json()["composition"]["exact"] is False


async def test_compose_errors_are_clear_4xx_and_leave_nothing(full, folders, tmp_path):
    await register_path(full, "a", folders["a"])
    await register_path(full, "c", folders["c"])
    before = {e.name for e in full.registry.entries()}
    cases = [
        ({"adapters": ["a", "ghost"]}, 404, "adapter_not_found", "compose.adapters.1"),
        ({"adapters": ["a", "base"]}, 400, "invalid_composition", "compose.adapters.1"),
        ({"adapters": ["a", "c"], "method": "ties", "density": 0.5}, 400, "invalid_composition", "compose.method"),
        ({"adapters": ["a", "c"], "weights": [1.0]}, 400, "invalid_composition", "compose.weights"),
        ({"adapters": ["a"], "method": "svd", "rank": 128}, 400, "invalid_composition", "compose.rank"),
        ({"adapters": ["a"], "colour": "red"}, 400, "unsupported_parameter", "compose.colour"),
        ({"adapters": []}, 400, "invalid_value", "compose.adapters"),
    ]
    for spec, status, code, param in cases:
        response = await compose_request(full, "bad", full.admin, **spec)
        assert response.status_code == status, (spec, response.text)
        error = response.json()["error"]
        assert (error["code"], error["param"]) == (code, param), spec
        assert str(tmp_path) not in error["message"]
    assert {e.name for e in full.registry.entries()} == before


async def test_cat_past_max_lora_rank_is_a_clear_400(tmp_path, folders):
    from tests.conftest import full_gateway

    async with full_gateway(tmp_path / "state", max_lora_rank=8) as gw:
        await register_path(gw, "a", folders["a"])
        await register_path(gw, "c", folders["c"])
        response = await compose_request(gw, "mix", gw.admin, adapters=["a", "c"])
        assert response.status_code == 400
        assert response.json()["error"]["message"] == (
            "cat gives rank 12 (8 + 4), above --max-lora-rank 8; use method svd with a rank of at most 8"
        )


async def test_tenants_compose_their_own_and_shared_adapters_only(full, folders):
    key_a, key_b = await new_tenant(full, "acme"), await new_tenant(full, "other")
    await register_path(full, "shared", folders["a"])
    assert (await upload(full, key_a, "mine", folders["b"])).status_code == 201
    assert (await upload(full, key_b, "theirs", folders["c"])).status_code == 201

    response = await compose_request(full, "mix", full.as_(key_a), adapters=["shared", "mine"], method="linear")
    assert response.status_code == 201, response.text
    assert full.registry.find("acme", "mix") is not None and full.registry.find("", "mix") is None
    # another tenant's adapter is a name that does not exist
    response = await compose_request(full, "mix2", full.as_(key_a), adapters=["shared", "theirs"])
    assert response.status_code == 404 and "theirs" in response.json()["error"]["message"]
    assert (await compose_request(full, "x", full.as_(key_b), adapters=["mix"])).status_code == 404
    # the admin names tenants' adapters as tenant/name, and may register for a tenant
    admin = await full.client.post(
        "/v1/adapters",
        json={"name": "both", "owner": "other", "compose": {"adapters": ["acme/mix", "other/theirs"], "method": "svd"}},
        headers=full.admin,
    )
    assert admin.status_code == 201, admin.text
    assert full.registry.find("other", "both").spec.rank == 12
    # registering from a server path stays the admin's
    path_form = await full.client.post(
        "/v1/adapters", json={"name": "p", "path": str(folders["a"])}, headers=full.as_(key_a)
    )
    assert path_form.status_code == 403


@pytest.mark.parametrize(
    ("file", "content", "phrase"),
    [
        ("adapter_config.json", b"[" * 5000 + b"]" * 5000, "odd: adapter_config.json is nested 5000 levels deep"),
        ("adapter_config.json", b" " * (64 * 1024 + 1), "odd: adapter_config.json is over 65536 bytes"),
        ("adapter_model.safetensors", b"\x10\x27\x00\x00\x00\x00\x00\x00" + b"[" * 10_000, "header is nested 10000"),
    ],
    ids=["nested-config", "large-config", "nested-header"],
)
def test_inputs_past_the_read_caps_are_refused(folders, tmp_path, file, content, phrase):
    odd = make_adapter(tmp_path / "odd")
    (odd / file).write_bytes(content)
    with pytest.raises(InvalidComposition) as raised:
        compose([folders["a"], odd], Recipe.of("cat", [1, 1]), tmp_path / "out", max_rank=64, names=["a", "odd"])
    assert phrase in raised.value.message


@pytest.mark.parametrize("alpha", [float("nan"), 0, -8, 1e308])
def test_inputs_with_senseless_lora_alpha_are_refused(folders, tmp_path, alpha):
    odd = make_adapter(tmp_path / "odd", config_overrides={"lora_alpha": alpha})
    with pytest.raises(InvalidComposition) as raised:
        compose([folders["a"], odd], Recipe.of("cat", [1, 1]), tmp_path / "out", max_rank=64, names=["a", "odd"])
    assert raised.value.message.startswith("odd: lora_alpha is") and "at most 80000" in raised.value.message
