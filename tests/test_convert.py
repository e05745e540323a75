"""adapters/convert.py and its entries: PEFT's adapter_model.bin and MiniMind's .pth become PEFT safetensors.

Through the conversion rules, the upload route (multipart, .tar.gz, format=minimind), registration
from a path, and `lora-gateway convert`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters import convert
from adapters.convert import MINIMIND_FILE, convert_staged, minimind_to_peft, write_peft_weights
from adapters.errors import InvalidAdapter
from server.commands import cli
from tests.adapter_files import TINY_BASE, TINY_CONFIG, make_adapter, tarball
from tests.test_sandbox import LeavesATrace

HIDDEN = TINY_BASE.module_shapes["q_proj"][0]


def bin_adapter(folder: Path, **kwargs) -> dict[str, torch.Tensor]:
    """A valid adapter for TINY_BASE whose weights are PEFT's pickled adapter_model.bin."""
    make_adapter(folder, **kwargs)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    torch.save(tensors, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    return tensors


def minimind_tensors(rank: int = 4, *, prefixed: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """MiniMind's save_lora output for TINY_BASE: q_proj and o_proj (its square layers), some keys 'module.'."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(TINY_BASE.num_layers):
        for module in ("q_proj", "o_proj"):
            key = f"model.layers.{layer}.self_attn.{module}.lora"
            prefix = "module." if prefixed and layer == 0 else ""
            tensors[f"{prefix}{key}.A.weight"] = torch.randn(rank, HIDDEN, generator=generator) * 0.02
            tensors[f"{prefix}{key}.B.weight"] = torch.randn(HIDDEN, rank, generator=generator) * 0.02
    return tensors


def stored_files(gateway) -> list[Path]:
    root = gateway.registry.store.root
    return sorted(path for path in root.rglob("*") if path.is_file())


# -- the rules --------------------------------------------------------------------------------------


def test_minimind_keys_map_to_peft_names_with_alpha_equal_to_rank():
    tensors = minimind_tensors(rank=4)
    converted, config = minimind_to_peft(tensors)
    assert config["r"] == 4 and config["lora_alpha"] == 4  # MiniMind adds B(A(x)) unscaled
    assert config["target_modules"] == ["o_proj", "q_proj"]
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    assert sorted(converted) == sorted(
        f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{half}.weight"
        for layer in range(2)
        for module in ("q_proj", "o_proj")
        for half in "AB"
    )
    # the 'module.' prefix of multi-GPU training is gone, and the tensors are the same ones
    assert (
        converted["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
        is (tensors["module.model.layers.0.self_attn.q_proj.lora.A.weight"])
    )
    assert (
        converted["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"]
        is (tensors["model.layers.1.self_attn.o_proj.lora.B.weight"])
    )


def test_minimind_rank_comes_from_a_and_mlp_targets_are_named_from_the_keys():
    tensors = {
        "model.layers.0.mlp.up_proj.lora.A.weight": torch.zeros(16, HIDDEN),
        "model.layers.0.mlp.up_proj.lora.B.weight": torch.zeros(96, 16),
    }
    _, config = minimind_to_peft(tensors)
    assert config["r"] == config["lora_alpha"] == 16 and config["target_modules"] == ["up_proj"]


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (lambda t: t.update({"model.embed_tokens.weight": torch.zeros(2, 2)}), "is not a MiniMind LoRA weight"),
        (lambda t: t.update({"lm_head.lora.A.weight": torch.zeros(2, 2)}), "is not a MiniMind LoRA weight"),
        (lambda t: t.pop("model.layers.1.self_attn.q_proj.lora.B.weight"), "has no lora.B.weight"),
        (
            lambda t: t.update({"model.layers.1.self_attn.q_proj.lora.B.weight": torch.zeros(HIDDEN, 3)}),
            "lora.A's rank 4 needs",
        ),
        (
            lambda t: t.update(
                {
                    "model.layers.1.self_attn.o_proj.lora.A.weight": torch.zeros(8, HIDDEN),
                    "model.layers.1.self_attn.o_proj.lora.B.weight": torch.zeros(HIDDEN, 8),
                }
            ),
            r"ranks differ \(4 and 8",
        ),
        (
            lambda t: t.update({"model.layers.0.self_attn.q_proj.lora.A.weight": torch.zeros(4, HIDDEN)}),
            "appears twice",
        ),
        (lambda t: t.update({"model.layers.1.self_attn.q_proj.lora.A.weight": torch.zeros(4)}), "not a matrix"),
        (lambda t: t.clear(), "holds no LoRA weights"),
    ],
    ids=["foreign-key", "lm-head", "missing-b", "b-rank", "mixed-ranks", "duplicate", "vector", "empty"],
)
def test_minimind_files_that_are_not_one_lora_are_refused(change, phrase):
    tensors = minimind_tensors(rank=4)
    change(tensors)
    with pytest.raises(InvalidAdapter, match=phrase):
        minimind_to_peft(tensors)


def test_peft_weights_with_other_names_are_refused(tmp_path):
    with pytest.raises(InvalidAdapter, match="'model.layers.0.q_proj.weight' is not a PEFT LoRA weight"):
        write_peft_weights({"model.layers.0.q_proj.weight": torch.zeros(2, 2)}, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()


@pytest.mark.parametrize("suffix", ["\n", "\u0661"], ids=["newline", "arabic-digit"])
def test_keys_are_matched_whole_and_in_ascii(tmp_path, suffix):
    peft_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" + suffix
    with pytest.raises(InvalidAdapter, match="is not a PEFT LoRA weight"):
        write_peft_weights({peft_key: torch.zeros(2, 2)}, tmp_path / "w.safetensors")
    tensors = minimind_tensors(rank=4)
    key = next(iter(tensors))
    tensors[key.replace(".0.", f".{suffix}.") if suffix != "\n" else key + suffix] = tensors.pop(key)
    with pytest.raises(InvalidAdapter, match="is not a MiniMind LoRA weight"):
        minimind_to_peft(tensors)


def test_with_safetensors_beside_it_the_pickle_is_deleted_unread(tmp_path):
    staging = make_adapter(tmp_path / "staging")
    before = (staging / "adapter_model.safetensors").read_bytes()
    torch.save({"x": LeavesATrace(tmp_path / "ran")}, staging / "adapter_model.bin")
    convert_staged(staging)
    assert not (staging / "adapter_model.bin").exists()
    assert (staging / "adapter_model.safetensors").read_bytes() == before
    assert not (tmp_path / "ran").exists()


def test_a_minimind_staging_folder_holds_the_one_file(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    torch.save(minimind_tensors(), staging / MINIMIND_FILE)
    (staging / "adapter_config.json").write_text("{}")
    with pytest.raises(InvalidAdapter, match="takes exactly one file"):
        convert_staged(staging, "minimind")
    with pytest.raises(InvalidAdapter, match="format must be one of peft, minimind"):
        convert_staged(staging, "gguf")


# -- registration -----------------------------------------------------------------------------------


async def test_an_uploaded_bin_is_served_as_safetensors_and_never_stored(full, tmp_path):
    tensors = bin_adapter(tmp_path / "src", rank=8)
    files = [
        ("file", (name, (tmp_path / "src" / name).read_bytes()))
        for name in ("adapter_config.json", "adapter_model.bin")
    ]
    response = await full.client.post("/v1/adapters", data={"name": "old-peft"}, files=files, headers=full.admin)
    assert response.status_code == 201, response.text
    assert response.json()["rank"] == 8 and response.json()["target_modules"] == ["q_proj", "v_proj"]
    stored = stored_files(full)
    assert sorted(p.name for p in stored) == ["adapter_config.json", "adapter_model.safetensors"]
    served = load_file(str(next(p for p in stored if p.suffix == ".safetensors")))
    assert all(torch.equal(served[k], tensors[k]) for k in tensors) and sorted(served) == sorted(tensors)
    entry = full.registry.find("", "old-peft")
    completion = {"model": "old-peft", "prompt": "hi", "max_tokens": 2}
    assert (await full.client.post("/v1/completions", json=completion, headers=full.admin)).status_code == 200
    assert entry.adapter_id in full.engine.added and entry.spec.path == stored[0].parent  # the engine's copy


async def test_a_bin_in_a_tarball_and_in_a_folder_is_converted(full, tmp_path):
    bin_adapter(tmp_path / "src", rank=4)
    archive = tarball(tmp_path / "src", prefix="my-adapter/")
    response = await full.client.post(
        "/v1/adapters", data={"name": "tgz"}, files=[("file", ("a.tar.gz", archive))], headers=full.admin
    )
    assert response.status_code == 201, response.text
    by_path = await full.client.post(
        "/v1/adapters", json={"name": "path", "path": str(tmp_path / "src")}, headers=full.admin
    )
    assert by_path.status_code == 201, by_path.text
    assert response.json()["content_hash"] == by_path.json()["content_hash"]  # one conversion, one result
    assert not any(p.suffix == ".bin" for p in stored_files(full))


async def test_an_uploaded_pickle_that_carries_code_is_a_400_and_leaves_nothing(full, tmp_path):
    make_adapter(tmp_path / "src")
    marker = tmp_path / "the-payload-ran"
    evil = tmp_path / "adapter_model.bin"
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": LeavesATrace(marker)}, evil)
    files = [
        ("file", ("adapter_config.json", (tmp_path / "src" / "adapter_config.json").read_bytes())),
        ("file", ("adapter_model.bin", evil.read_bytes())),
    ]
    response = await full.client.post("/v1/adapters", data={"name": "evil"}, files=files, headers=full.admin)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_adapter" and "which is code; it was not run" in error["message"]
    assert str(tmp_path) not in response.text
    assert not marker.exists()
    assert full.registry.find("", "evil") is None
    assert stored_files(full) == []  # nothing stored, nothing left in staging


async def test_a_minimind_upload_becomes_a_peft_adapter(full, tmp_path):
    tensors = minimind_tensors(rank=4)
    torch.save(tensors, tmp_path / "lora_identity_64.pth")
    upload = [("file", ("lora_identity_64.pth", (tmp_path / "lora_identity_64.pth").read_bytes()))]
    response = await full.client.post(
        "/v1/adapters", data={"name": "mini", "format": "minimind"}, files=upload, headers=full.admin
    )
    assert response.status_code == 201, response.text
    card = response.json()
    assert card["rank"] == 4 and card["target_modules"] == ["o_proj", "q_proj"]
    stored = {p.name: p for p in stored_files(full)}
    assert sorted(stored) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads(stored["adapter_config.json"].read_text())
    assert config["lora_alpha"] == config["r"] == 4
    served = load_file(str(stored["adapter_model.safetensors"]))
    assert torch.equal(
        served["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
        tensors["module.model.layers.0.self_attn.q_proj.lora.A.weight"],
    )


async def test_a_minimind_upload_for_another_base_is_refused_naming_the_problem(full, tmp_path):
    tensors = {
        "model.layers.0.self_attn.q_proj.lora.A.weight": torch.zeros(4, 512),
        "model.layers.0.self_attn.q_proj.lora.B.weight": torch.zeros(512, 4),
    }
    torch.save(tensors, tmp_path / "big.pth")
    upload = [("file", ("big.pth", (tmp_path / "big.pth").read_bytes()))]
    response = await full.client.post(
        "/v1/adapters", data={"name": "mini", "format": "minimind"}, files=upload, headers=full.admin
    )
    assert response.status_code == 400 and "has shape [4, 512]" in response.json()["error"]["message"]
    assert stored_files(full) == []


async def test_the_format_field_is_checked(full, tmp_path):
    make_adapter(tmp_path / "src")
    files = [("file", (p.name, p.read_bytes())) for p in sorted((tmp_path / "src").iterdir())]
    bogus = await full.client.post(
        "/v1/adapters", data={"name": "x", "format": "gguf"}, files=files, headers=full.admin
    )
    assert bogus.status_code == 400 and bogus.json()["error"]["param"] == "format"
    assert "peft, minimind" in bogus.json()["error"]["message"]
    two = await full.client.post(
        "/v1/adapters", data={"name": "x", "format": "minimind"}, files=files, headers=full.admin
    )
    assert two.status_code == 400 and "one file" in two.json()["error"]["message"]
    plain = await full.client.post(
        "/v1/adapters", data={"name": "x", "format": "peft"}, files=files, headers=full.admin
    )
    assert plain.status_code == 201, plain.text


async def test_a_pth_without_format_minimind_says_how_to_send_it(full, tmp_path):
    torch.save(minimind_tensors(), tmp_path / "lora.pth")
    upload = [("file", ("lora.pth", (tmp_path / "lora.pth").read_bytes()))]
    response = await full.client.post("/v1/adapters", data={"name": "mini"}, files=upload, headers=full.admin)
    assert response.status_code == 400 and "format=minimind" in response.json()["error"]["message"]


# -- lora-gateway convert ---------------------------------------------------------------------------


def convert_parser():
    parser = cli.build_parser()
    subcommands = next(action for action in parser._actions if action.dest == "command")
    return subcommands.choices["convert"]


def test_convert_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["convert", "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    for action in convert_parser()._actions:
        assert action.help and len(action.help) > 20, action.dest
        for flag in action.option_strings:
            assert flag in shown
    assert "never with\ntorch.load" in shown and "lora_alpha = r" in shown and "module." in shown


def tiny_base_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    return folder


def test_convert_turns_a_bin_folder_into_safetensors_offline(tmp_path):
    tensors = bin_adapter(tmp_path / "src")
    env = {"PATH": os.defpath, "HF_HUB_OFFLINE": "1", "no_proxy": "*"}  # no network, no credentials
    done = subprocess.run(
        [sys.executable, "-m", "server", "convert", str(tmp_path / "src"), "--out", str(tmp_path / "out")]
        + ["--base-model", str(tiny_base_dir(tmp_path))],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "rank 8, lora_alpha 16, target modules q_proj, v_proj; checked against" in done.stdout
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (out / "adapter_config.json").read_bytes() == (tmp_path / "src" / "adapter_config.json").read_bytes()
    converted = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.equal(converted[k], tensors[k]) for k in tensors)
    assert (tmp_path / "src" / "adapter_model.bin").exists()  # the source is left as it was


def test_convert_turns_a_minimind_pth_into_a_peft_adapter(tmp_path, capsys):
    torch.save(minimind_tensors(rank=8), tmp_path / "lora.pth")
    (tmp_path / "out").mkdir()  # an empty folder will do
    assert cli.main(["convert", str(tmp_path / "lora.pth"), "--out", str(tmp_path / "out")]) == 0
    assert "rank 8, lora_alpha 8, target modules o_proj, q_proj" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8


def test_convert_errors_exit_2_with_a_message_and_write_nothing(tmp_path, capsys):
    marker = tmp_path / "the-payload-ran"
    make_adapter(tmp_path / "evil")
    torch.save({"a": LeavesATrace(marker)}, tmp_path / "evil" / "adapter_model.bin")
    base = str(tiny_base_dir(tmp_path))
    cases = {
        "code": ([str(tmp_path / "evil"), "--out", str(tmp_path / "o1")], "which is code; it was not run"),
        "missing": ([str(tmp_path / "nope"), "--out", str(tmp_path / "o2")], "does not exist"),
        "not-empty": ([str(tmp_path / "evil"), "--out", str(tmp_path / "evil")], "is not an empty folder"),
        "no-bin": (
            [str(make_adapter(tmp_path / "plain")), "--out", str(tmp_path / "o3")],
            "holds no adapter_model.bin",
        ),
        "bad-base": (
            [str(tmp_path / "evil"), "--out", str(tmp_path / "o4"), "--base-model", str(tmp_path)],
            "--base-model",
        ),
        "bad-timeout": ([str(tmp_path / "evil"), "--out", str(tmp_path / "o5"), "--timeout", "0"], "--timeout must be"),
    }
    for case, (argv, phrase) in cases.items():
        assert cli.main(["convert", *argv]) == 2, case
        err = capsys.readouterr().err
        assert "lora-gateway convert: error: " in err and phrase in err, (case, err)
    torch.save(minimind_tensors(rank=32), tmp_path / "lora.pth")
    argv = [str(tmp_path / "lora.pth"), "--out", str(tmp_path / "o6"), "--base-model", base, "--max-lora-rank", "16"]
    assert cli.main(["convert", *argv]) == 2
    assert "adapter rank 32 exceeds --max-lora-rank 16" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli.main(["convert", str(tmp_path / "lora.pth"), "--out", str(tmp_path / "o7"), "--format", "gguf"])
    assert exited.value.code == 2
    assert not marker.exists()
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4", "o5", "o6", "o7"))
    assert not list(tmp_path.glob(".convert-*"))


def test_an_oversized_config_is_refused_before_the_pickle_is_loaded(tmp_path, monkeypatch):
    source = make_adapter(tmp_path / "src")
    (source / "adapter_model.safetensors").unlink()
    (source / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    (source / "adapter_config.json").write_bytes(b" " * (64 * 1024 + 1))
    monkeypatch.setattr(convert, "load_pickled_tensors", lambda *args: pytest.fail("the sandbox was started"))
    with pytest.raises(InvalidAdapter, match="adapter_config.json is over 65536 bytes; at most 65536 are accepted"):
        convert.convert_into(source, tmp_path / "out", convert.PEFT)
    assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidAdapter, match="adapter_config.json is over 65536 bytes"):  # an upload, staged
        convert.convert_staged(source, convert.PEFT)
