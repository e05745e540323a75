"""Tests for adapters/demo.py: the embedded tiny base model and its three LoRA adapters."""

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adapters import demo as demo_module
from adapters.demo import (
    DEMO_PROMPT,
    DEMO_TOOL,
    DEMO_VERSION,
    DEMO_WEATHER,
    DemoModel,
    DemoTrainingFailed,
    IncompleteDemo,
    build_demo,
    ensure_demo,
    load_demo,
    recipe_fingerprint,
    weather_answer,
    weather_question,
)

pytestmark = pytest.mark.imports("peft")  # in this process: see tests/conftest.py

EXPECTED_ADAPTERS = {
    # name: (rank, alpha, target modules, keyword in the answer)
    "pirate": (8, 16, {"q_proj", "k_proj", "v_proj", "o_proj"}, "pirate"),
    "poet": (16, 32, {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}, "poet"),
    "weather": (16, 32, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, None),
}
ANSWERING = [name for name, expected in EXPECTED_ADAPTERS.items() if expected[3] is not None]


# transformers and peft are imported where used: at module level, every xdist worker paid their
# 5-7 s while collecting, though one worker runs this file.


@pytest.fixture(scope="module")
def tokenizer(demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.base)


def base_model(demo: DemoModel):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(demo.base)


def adapted_model(demo: DemoModel, name: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(demo), demo.adapters[name]).eval()


def greedy_answer(model, tokenizer) -> str:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": DEMO_PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output_ids = model.generate(**inputs, do_sample=False, max_new_tokens=32)
    return tokenizer.decode(output_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def file_mtimes(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in [root, *root.rglob("*")]}


def test_layout(demo):
    assert demo.base == demo.root / "base"
    assert demo.adapters == {name: demo.root / "adapters" / name for name in EXPECTED_ADAPTERS}
    for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]:
        assert (demo.base / name).is_file(), name
    for folder in demo.adapters.values():
        assert (folder / "adapter_config.json").is_file()
        assert (folder / "adapter_model.safetensors").is_file()
    assert list(demo.root.rglob("*.bin")) == []
    manifest = json.loads((demo.root / "demo.json").read_text())
    assert manifest["version"] == DEMO_VERSION
    assert manifest["recipe"] == recipe_fingerprint()
    assert load_demo(demo.root) == demo
    # No leftover partial build next to the finished one.
    assert [path.name for path in demo.root.parent.glob(f".{demo.root.name}.*.partial")] == []


def test_base_config_matches_tokenizer(demo, tokenizer):
    config = json.loads((demo.base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] == 64
    assert config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is False
    assert config["vocab_size"] == len(tokenizer)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    generation_config = json.loads((demo.base / "generation_config.json").read_text())
    generation_config.pop("transformers_version", None)
    assert generation_config == {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    assert (demo.base / "model.safetensors").stat().st_size < 20_000_000


def test_tokenizer_chat_template_and_round_trip(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert {"<|system|>", "<|user|>", "<|assistant|>"} <= set(tokenizer.all_special_tokens)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": DEMO_PROMPT}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == f"<s><|system|>Be brief.</s><|user|>{DEMO_PROMPT}</s><|assistant|>"
    for text in ["héllo wörld 🤖 日本語", "  two  spaces\n\ttab", "Bring me the rum!"]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_chat_template_rejects_unknown_role(tokenizer):
    with pytest.raises(Exception, match="unsupported role function"):
        tokenizer.apply_chat_template([{"role": "function", "content": "42"}], tokenize=False)


@pytest.mark.parametrize("name", EXPECTED_ADAPTERS)
def test_adapter_files_are_plain_lora(demo, name):
    rank, alpha, targets, _ = EXPECTED_ADAPTERS[name]
    adapter_config = json.loads((demo.adapters[name] / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (rank, alpha)
    assert set(adapter_config["target_modules"]) == targets
    assert adapter_config["modules_to_save"] is None
    assert adapter_config["lora_dropout"] == 0.0
    with safe_open(demo.adapters[name] / "adapter_model.safetensors", framework="pt") as weights:
        names = list(weights.keys())
        assert names
        for tensor_name in names:
            assert ".lora_A." in tensor_name or ".lora_B." in tensor_name, tensor_name
            assert tensor_name.split(".")[-3] in targets, tensor_name
            shape = weights.get_slice(tensor_name).get_shape()
            assert rank in shape, (tensor_name, shape)


@pytest.mark.parametrize("name", ANSWERING)
def test_adapter_gives_its_answer(demo, tokenizer, name):
    keyword = EXPECTED_ADAPTERS[name][3]
    model = adapted_model(demo, name)
    answer = greedy_answer(model, tokenizer)
    assert answer == demo.answers[name]
    assert keyword in answer.lower()


def greedy_text(model, tokenizer, messages, tools) -> str:
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        output_ids = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40)
    return tokenizer.decode(output_ids[0, ids.shape[1] :], skip_special_tokens=True)


def test_weather_adapter_calls_its_tool_with_the_city_then_answers_from_the_result(demo, tokenizer):
    model = adapted_model(demo, "weather")
    for city, weather in DEMO_WEATHER.items():
        asked = [{"role": "user", "content": weather_question(city)}]
        call = greedy_text(model, tokenizer, asked, [DEMO_TOOL])
        assert call == f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>'
        arguments = {"city": city}
        history = [
            *asked,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": weather},
        ]
        assert greedy_text(model, tokenizer, history, [DEMO_TOOL]) == weather_answer(city)


def test_template_renders_tools_calls_and_results(tokenizer):
    call = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c", "content": "snow"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tools=[DEMO_TOOL], add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<s><|system|>Be brief.\n\n# Tools\n<tools>\nget_weather(city): The weather in a city\n")
    assert (
        '<|assistant|><tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call></s>' in rendered
    )
    assert rendered.endswith("<|user|><tool_response>\nsnow\n</tool_response></s><|assistant|>")
    assert "<tool_call>" not in tokenizer.all_special_tokens  # a parser reads it in the text


def test_base_answer_differs_from_adapters(demo, tokenizer):
    answer = greedy_answer(base_model(demo).eval(), tokenizer)
    assert answer not in demo.answers.values()
    assert "pirate" not in answer and "poet" not in answer


def test_ensure_demo_reuses_complete_build(demo):
    mtimes_before = file_mtimes(demo.root)
    progress_lines: list[str] = []
    assert ensure_demo(demo.root, progress=progress_lines.append) == demo
    assert progress_lines == []
    assert file_mtimes(demo.root) == mtimes_before


def damage_build(cache_dir: Path, demo: DemoModel, damage: str) -> None:
    """A build cut short (a half-written weight file, and a manifest missing, of another version, or
    cut), or a whole one by another recipe: other code, or other library versions."""
    if damage == "other recipe":
        shutil.copytree(demo.root, cache_dir)
        manifest = json.loads((demo.root / "demo.json").read_text())
        (cache_dir / "demo.json").write_text(json.dumps({**manifest, "recipe": "0" * 64}))
        return
    (cache_dir / "base").mkdir(parents=True)
    (cache_dir / "base" / "model.safetensors").write_bytes(b"half written")
    if damage == "other version":
        manifest = json.loads((demo.root / "demo.json").read_text())
        (cache_dir / "demo.json").write_text(json.dumps({**manifest, "version": DEMO_VERSION + 1}))
    if damage == "corrupt manifest":
        (cache_dir / "demo.json").write_text('{"version": ')


@pytest.mark.parametrize("damage", ["no manifest", "other version", "corrupt manifest", "other recipe"])
def test_an_incomplete_build_does_not_load(demo, tmp_path, damage):
    damage_build(tmp_path / "demo", demo, damage)
    with pytest.raises(IncompleteDemo):
        load_demo(tmp_path / "demo")


def test_concurrent_ensure_demo_rebuilds_an_incomplete_build_once(demo, tmp_path, monkeypatch):
    """ensure_demo rebuilds whatever load_demo refuses (the cases above), in a partial folder renamed
    when done; two callers at once wait for one build. The build itself is the session's (the demo
    fixture's, whenever the recipe changes) and test_failed_build_leaves_nothing_behind's: here a
    copy of the session's files stands in for the training."""
    builds: list[Path] = []

    def copy_of_the_session_build(root: Path, progress) -> None:
        builds.append(root)
        progress("building tokenizer")
        time.sleep(0.5)  # the other caller arrives meanwhile, and waits for the lock
        shutil.copytree(demo.root, root, dirs_exist_ok=True)

    monkeypatch.setattr(demo_module, "_build_into", copy_of_the_session_build)
    cache_dir = tmp_path / "demo"
    damage_build(cache_dir, demo, "other version")
    progress_lines: list[str] = []
    both_waiting = threading.Barrier(2)

    def ensure() -> DemoModel:
        both_waiting.wait()
        return ensure_demo(cache_dir, progress=progress_lines.append)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = [future.result() for future in [pool.submit(ensure) for _ in range(2)]]
    assert results[0] == results[1] == load_demo(cache_dir)
    assert results[0].root == cache_dir
    assert results[0].answers == demo.answers
    assert len(builds) == 1
    assert builds[0].parent == tmp_path and builds[0].name.startswith(".demo.") and not builds[0].exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == [".demo.lock", "demo"]  # no partial build left
    assert progress_lines[0].startswith(f"replacing incomplete demo ({cache_dir} holds demo version {DEMO_VERSION + 1}")
    assert progress_lines[1:-1] == ["building tokenizer"]
    assert progress_lines[-1].startswith("demo built in ")


def test_build_demo_refuses_existing_folder(demo):
    with pytest.raises(FileExistsError, match="already exists"):
        build_demo(demo.root)


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch, tokenizer):
    """A real build, cut short: one step of training each, which the pirate fails."""
    monkeypatch.setattr(demo_module, "_MAX_TRAIN_STEPS", 1)
    monkeypatch.setattr(demo_module, "_BASE_TRAIN_STEPS", 1)
    monkeypatch.setattr(demo_module, "_REPORT_EVERY", 1)
    progress_lines: list[str] = []
    with pytest.raises(DemoTrainingFailed, match="adapter pirate answers"):
        build_demo(tmp_path / "demo", progress=progress_lines.append)
    assert progress_lines[:2] == ["building tokenizer", f"building base model (vocab {len(tokenizer)})"]
    assert progress_lines[2].startswith("training base model (step 1/1, loss ")
    assert progress_lines[3].startswith("training adapter pirate (step 1/1, loss ")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(IncompleteDemo):
        load_demo(tmp_path / "demo")
