"""Merge and export: an adapter folded into its base model, and `lora-gateway merge`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.base_model import fingerprint
from adapters.database import AdapterRow, BaseIdentity, Database
from adapters.errors import InvalidAdapter, MergeFailed
from adapters.merge import merge_adapter
from adapters.store import AdapterStore, copy_folder
from adapters.validate import validate_adapter
from server.commands.cli import build_parser, main
from tests.adapter_files import TINY_BASE, TINY_CONFIG, make_adapter

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.imports("peft")]

WORDS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", *(f"w{i}" for i in range(27))]
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}"


def make_tiny_model(folder: Path) -> Path:
    """A random Llama of TINY_BASE's shapes, saved in float32 with a tokenizer and chat template."""
    # transformers (and peft below) are imported by the tests that use them: at module level every
    # xdist worker paid their 5-7 s while collecting, even one that runs none of these tests.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        **TINY_CONFIG,
        vocab_size=len(WORDS),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype=torch.float32,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    # Larger than make_adapter's default weights, so that the merge visibly moves the logits.
    folder = make_adapter(
        tmp_path_factory.mktemp("adapter") / "support", rank=8, targets=("q_proj", "v_proj", "up_proj")
    )
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v * 10 for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


IDS = [1, 3, 7, 8, 9, 4, 10, 11]


def test_merged_folder_computes_what_base_plus_adapter_does(tiny_model, adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = merge_adapter(tiny_model, adapter, tmp_path / "merged", progress=False)
    assert merged.dtype == "float32" and merged.rank == 8
    folder = tmp_path / "merged"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (folder / name).read_bytes() == (tiny_model / name).read_bytes(), name
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert not list(tmp_path.glob(".*partial"))

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter).eval()
    want = logits(reference, IDS)
    got = logits(AutoModelForCausalLM.from_pretrained(folder).eval(), IDS)
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_model).eval(), IDS)
    assert (want - base).abs().max() > 1e-2  # the adapter changes the output, so equality means something
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_the_addition_is_float32_and_cast_once(tiny_model, adapter, tmp_path):
    merge_adapter(tiny_model, adapter, tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    merged = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    base = load_file(str(tiny_model / "model.safetensors"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "model.layers.0.self_attn.q_proj"
    weight = base[f"{prefix}.weight"]
    delta = 2.0 * lora[f"base_model.model.{prefix}.lora_B.weight"] @ lora[f"base_model.model.{prefix}.lora_A.weight"]
    once = (weight + delta).to(torch.bfloat16)
    twice = weight.to(torch.bfloat16) + delta.to(torch.bfloat16)  # what merging in bfloat16 would give
    assert merged[f"{prefix}.weight"].dtype == torch.bfloat16
    assert torch.equal(merged[f"{prefix}.weight"], once)
    assert not torch.equal(once, twice)  # the two roundings differ here, so the test tells them apart
    # untouched weights come through the float32 round trip bit for bit
    assert torch.equal(
        merged["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"].bfloat16()
    )


def test_refusals_leave_nothing_behind(tiny_model, adapter, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    with pytest.raises(MergeFailed, match="exists and is not empty"):
        merge_adapter(tiny_model, adapter, taken, progress=False)
    other_base = make_adapter(tmp_path / "wide", rank=4, targets=("q_proj",))
    from tests.adapter_files import rewrite_tensors

    rewrite_tensors(
        other_base, lambda t: t.update({k: torch.zeros(4, 128).numpy() for k in t if k.endswith("lora_A.weight")})
    )
    with pytest.raises(InvalidAdapter, match="has shape"):
        merge_adapter(tiny_model, other_base, tmp_path / "out", progress=False)
    with pytest.raises(MergeFailed, match="no config.json"):
        merge_adapter(tmp_path, adapter, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "wide"]


# -- lora-gateway merge -------------------------------------------------------------------------


def test_merge_help_explains_each_flag():
    merge = build_parser()._subparsers._group_actions[0].choices["merge"]
    text = merge.format_help()
    for flag in (
        "--model",
        "--adapter",
        "--out",
        "--dtype",
        "--threads",
        "--state-dir",
        "--catalog-url",
        "--store-url",
    ):
        action = next(a for a in merge._actions if flag in a.option_strings)
        assert action.help and len(action.help) > 20, flag
    assert "merge_and_unload(safe_merge=True)" in text and "float32" in text


def register_in_catalog(state: Path, model: Path, owner: str, name: str, folder: Path) -> None:
    """What `serve` leaves behind for a registered adapter: the store's copy and a catalog row."""
    store = AdapterStore(state / "adapters")
    staging = store.new_staging()
    copy_folder(folder, staging, 1 << 30)
    spec = validate_adapter(staging, TINY_BASE, max_rank=64)
    store.commit(staging, spec.content_hash)
    catalog = Database(state / "catalog.sqlite3", BaseIdentity("base", fingerprint(model)))
    if owner:
        catalog.add_tenant(owner, {})  # a tenant's adapter needs its tenant
    row = AdapterRow(
        owner, name, spec.content_hash, spec.rank, spec.target_modules, spec.size_bytes, False, time.time()
    )
    catalog.put_adapter(row)
    catalog.close()


def test_merge_command_takes_a_folder_or_a_registered_name(tiny_model, adapter, tmp_path, capsys):
    assert main(["merge", "--model", str(tiny_model), "--adapter", str(adapter), "--out", str(tmp_path / "a")]) == 0
    assert "merged model in" in capsys.readouterr().out
    state = tmp_path / "state"
    register_in_catalog(state, tiny_model, "acme", "support", adapter)
    args = ["merge", "--model", str(tiny_model), "--state-dir", str(state), "--threads", "1"]
    assert main([*args, "--adapter", "acme/support", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()

    assert main([*args, "--adapter", "support", "--out", str(tmp_path / "c")]) == 2
    assert "nor an adapter registered on this base model (registered: acme/support)" in capsys.readouterr().err
    assert main([*args, "--adapter", "x", "--out", str(tmp_path / "c"), "--state-dir", str(tmp_path / "none")]) == 2
    assert "no catalog under" in capsys.readouterr().err
    assert main([*args, "--adapter", str(adapter), "--out", str(tmp_path / "a")]) == 2
    assert "--out: the output folder exists" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
