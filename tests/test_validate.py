from __future__ import annotations

import json
import struct
import time

import pytest

from adapters.errors import AdapterTooLarge, InvalidAdapter, InvalidAdapterName
from adapters.limits import MAX_CONFIG_BYTES, MAX_SAFETENSORS_HEADER_BYTES, json_depth
from adapters.store import copy_folder
from adapters.validate import NAME_PATTERN, check_name, validate_adapter
from server.http.errors import http_status
from tests.adapter_files import BAD_CASES, TINY_BASE, bad_adapters, make_adapter
from tests.security.bombs import nested_json, safetensors_with_header


def stage_and_validate(source, tmp_path, max_bytes=10_000_000):
    """What the registry does: copy without following links, then validate the copy."""
    staging = tmp_path / "staging"
    staging.mkdir()
    copy_folder(source, staging, max_bytes)
    return validate_adapter(staging, TINY_BASE, max_rank=16, max_bytes=max_bytes)


def test_a_good_adapter_gives_its_spec(tmp_path):
    folder = make_adapter(tmp_path / "good", rank=8, targets=("q_proj", "down_proj"))
    spec = validate_adapter(folder, TINY_BASE, max_rank=16)
    assert spec.rank == 8
    assert spec.target_modules == ("down_proj", "q_proj")
    assert spec.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
    assert len(spec.content_hash) == 64
    same = validate_adapter(
        make_adapter(tmp_path / "same", rank=8, targets=("q_proj", "down_proj")), TINY_BASE, max_rank=16
    )
    other = validate_adapter(
        make_adapter(tmp_path / "other", rank=8, targets=("q_proj", "down_proj"), seed=1), TINY_BASE, max_rank=16
    )
    assert same.content_hash == spec.content_hash != other.content_hash


def test_peft_module_paths_in_target_modules_are_accepted(tmp_path):
    folder = make_adapter(
        tmp_path / "paths", config_overrides={"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"]}
    )
    assert validate_adapter(folder, TINY_BASE, max_rank=16).target_modules == ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return bad_adapters(tmp_path_factory.mktemp("bad"))


def test_the_corpus_covers_every_case(corpus):
    assert sorted(corpus) == sorted(BAD_CASES)


@pytest.mark.parametrize("case", BAD_CASES)
def test_each_bad_adapter_is_refused_with_a_reason(corpus, case, tmp_path):
    folder, phrase = corpus[case]
    with pytest.raises(InvalidAdapter) as refused:
        stage_and_validate(folder, tmp_path)
    assert phrase in refused.value.message
    assert http_status(refused.value) == 400
    assert str(tmp_path) not in refused.value.message and "/" not in refused.value.message.replace("A/B", "")


def test_size_limit_is_413(tmp_path):
    folder = make_adapter(tmp_path / "big", rank=16)
    with pytest.raises(AdapterTooLarge) as refused:
        stage_and_validate(folder, tmp_path, max_bytes=4096)
    assert http_status(refused.value) == 413


# -- caps before parsing -------------------------------------------------------------------------


def with_config_text(folder, text: bytes):
    (folder / "adapter_config.json").write_bytes(text)
    return folder


def test_adapter_config_is_capped_at_64_kib_before_it_is_parsed(tmp_path):
    config = json.loads((make_adapter(tmp_path / "source") / "adapter_config.json").read_text())
    just_fits = json.dumps(config).encode().ljust(MAX_CONFIG_BYTES)  # JSON allows trailing whitespace
    assert validate_adapter(with_config_text(make_adapter(tmp_path / "fits"), just_fits), TINY_BASE, max_rank=16)
    over = with_config_text(make_adapter(tmp_path / "over"), just_fits + b" ")
    with pytest.raises(InvalidAdapter) as refused:
        validate_adapter(over, TINY_BASE, max_rank=16)
    assert refused.value.message == "adapter_config.json is over 65536 bytes; at most 65536 bytes are accepted"
    assert http_status(refused.value) == 400


def test_adapter_config_nesting_is_bounded_before_json_recurses(tmp_path):
    config = json.loads((make_adapter(tmp_path / "source") / "adapter_config.json").read_text())
    deep = 31  # the config object is the first level
    fits = (
        json.dumps(config | {"notes": "[" * 100 + "{" * 100}).encode()[:-1]
        + b', "x": '
        + b"[" * deep
        + b"]" * deep
        + b"}"
    )
    assert validate_adapter(with_config_text(make_adapter(tmp_path / "fits"), fits), TINY_BASE, max_rank=16)
    too_deep = fits.replace(b"[" * deep, b"[" * (deep + 1)).replace(b"]" * deep, b"]" * (deep + 1))
    with pytest.raises(InvalidAdapter, match="adapter_config.json is nested 33 levels deep; at most 32"):
        validate_adapter(with_config_text(make_adapter(tmp_path / "deep"), too_deep), TINY_BASE, max_rank=16)
    # 30,000 levels: once a RecursionError (a 500); refused before json sees it
    bomb = with_config_text(make_adapter(tmp_path / "bomb"), b"[" * 30_000 + b"]" * 30_000)
    with pytest.raises(InvalidAdapter, match="nested 30000 levels deep"):
        validate_adapter(bomb, TINY_BASE, max_rank=16)


def test_a_safetensors_header_is_capped_before_it_is_read(tmp_path):
    folder = make_adapter(tmp_path / "big")
    weights = folder / "adapter_model.safetensors"
    declared = MAX_SAFETENSORS_HEADER_BYTES + 1
    weights.write_bytes(struct.pack("<Q", declared) + b"{" * declared)
    with pytest.raises(InvalidAdapter) as refused:
        validate_adapter(folder, TINY_BASE, max_rank=16)
    assert refused.value.message.startswith(f"adapter_model.safetensors has a header of {declared} bytes; at most")
    weights.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(InvalidAdapter, match="its header runs past its end"):
        validate_adapter(folder, TINY_BASE, max_rank=16)


def test_a_nested_safetensors_header_is_refused_before_it_is_parsed(tmp_path):
    folder = make_adapter(tmp_path / "nested")
    (folder / "adapter_model.safetensors").write_bytes(safetensors_with_header(nested_json(50 * 1024)))
    with pytest.raises(InvalidAdapter, match=r"adapter_model.safetensors's header is nested 10240 levels deep"):
        validate_adapter(folder, TINY_BASE, max_rank=16)


@pytest.mark.parametrize(
    "change, phrase",
    [
        (lambda info: info.update(dtype=["F32"]), "has dtype ['F32']"),
        (lambda info: info.update(data_offsets=[0, 1, 2]), "points outside"),
        (lambda info: info.update(data_offsets=7), "points outside"),
        (lambda info: info.update(shape="x" * 10_000), "has shape " + "x" * 80 + ";"),
    ],
    ids=["unhashable-dtype", "three-offsets", "number-offsets", "long-shape"],
)
def test_odd_header_values_are_refused_not_crashed_on(tmp_path, change, phrase):
    folder = make_adapter(tmp_path / "odd")
    weights = folder / "adapter_model.safetensors"
    raw = weights.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    change(header[sorted(name for name in header if name != "__metadata__")[0]])
    text = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
    with pytest.raises(InvalidAdapter) as refused:
        validate_adapter(folder, TINY_BASE, max_rank=16)
    assert phrase in refused.value.message


@pytest.mark.parametrize(
    "text, depth",
    [
        (b"{}", 1),
        (b'{"a": [[1, {"b": []}]]}', 5),
        (b'{"brackets in strings": "[[[[{{{{", "escaped": "\\"[[["}', 1),
        (b'"\\\\"', 0),
        (b"[[[]]][]", 3),
        (b"", 0),
    ],
)
def test_json_depth_skips_strings(text, depth):
    assert json_depth(text) == depth


def test_json_depth_is_linear_on_unterminated_strings():
    started = time.perf_counter()
    assert json_depth(b'"' + b'\\"[' * 1_000_000) == 0  # one string that never ends: no brackets
    assert json_depth(b'["' + b"[" * 1_000_000) == 1
    assert time.perf_counter() - started < 1.0


# -- names are matched whole -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alpha\n", "alpha\n\n", "a" * 65, "", "-lead", "al pha", "\u0661", "a/b", None, 7])
def test_a_name_is_matched_whole(name):
    with pytest.raises(InvalidAdapterName) as refused:
        check_name(name)
    assert refused.value.message.startswith("adapter names are 1-64 characters") and refused.value.param == "name"
    if isinstance(name, str):  # server/ calls NAME_PATTERN.match: it must not take a prefix either
        assert NAME_PATTERN.match(name) is None


@pytest.mark.parametrize("name", ["a", "a" * 64, "Support-Bot_v2.1:beta"])
def test_names_up_to_64_characters_are_accepted(name):
    assert check_name(name) == name and NAME_PATTERN.match(name)


@pytest.mark.parametrize("suffix", ["\n", "\u0661"], ids=["newline", "arabic-digit"])
def test_tensor_names_are_matched_whole_and_in_ascii(tmp_path, suffix):
    folder = make_adapter(tmp_path / "odd")
    weights = folder / "adapter_model.safetensors"
    raw = weights.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    name = sorted(n for n in header if n.startswith("base_model.model.model.layers.0."))[0]
    renamed = name + suffix if suffix == "\n" else name.replace(".layers.0.", f".layers.{suffix}.")
    header[renamed] = header.pop(name)
    text = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
    with pytest.raises(InvalidAdapter, match="is not a LoRA A/B weight of a decoder layer"):
        validate_adapter(folder, TINY_BASE, max_rank=16)


# -- lora_alpha and r ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alpha, shown",
    [(float("nan"), "nan"), (float("inf"), "inf"), (-16, "-16"), (0, "0"), (1e308, "1e+308"), (80_001, "80001")],
)
def test_lora_alpha_must_be_finite_positive_and_at_most_10000_r(tmp_path, alpha, shown):
    folder = make_adapter(tmp_path / "odd", rank=8, config_overrides={"lora_alpha": alpha})
    with pytest.raises(InvalidAdapter) as refused:
        validate_adapter(folder, TINY_BASE, max_rank=16)
    assert refused.value.message.startswith(
        f"lora_alpha is {shown}; it must be a number above 0 and at most 80000 (10000 × r); "
        "PEFT's usual values are r or 2 × r"
    )
    assert http_status(refused.value) == 400


@pytest.mark.parametrize("alpha", [0.5, 8, 16, 80_000])
def test_sensible_lora_alphas_are_accepted(tmp_path, alpha):
    folder = make_adapter(tmp_path / "fine", rank=8, config_overrides={"lora_alpha": alpha})
    assert validate_adapter(folder, TINY_BASE, max_rank=16).rank == 8


def test_nan_in_the_config_file_itself_is_refused(tmp_path):
    # Python's json reads NaN and Infinity, which JSON does not have; the value check catches them.
    folder = make_adapter(tmp_path / "nan")
    config = (folder / "adapter_config.json").read_text().replace('"lora_alpha": 16', '"lora_alpha": NaN')
    (folder / "adapter_config.json").write_text(config)
    with pytest.raises(InvalidAdapter, match="lora_alpha is nan"):
        validate_adapter(folder, TINY_BASE, max_rank=16)


@pytest.mark.parametrize("rank", [0, -1, 1.5, True, "8", 1e308])
def test_r_must_be_a_whole_number_within_the_limit(tmp_path, rank):
    folder = make_adapter(tmp_path / "odd", config_overrides={"r": rank})
    with pytest.raises(InvalidAdapter, match="r \\(the rank\\) must be a whole number from 1 to --max-lora-rank 16"):
        validate_adapter(folder, TINY_BASE, max_rank=16)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_weights_of_every_float_dtype_are_checked_for_nan_and_infinity(tmp_path, dtype):
    """The check reads each dtype's exponent bits: the largest finite value and the smallest
    subnormal pass; NaN, +inf and -inf anywhere in a tensor are refused, naming it."""
    import torch
    from safetensors.torch import save_file

    from adapters.validate import _check_finite, read_safetensors_header

    kind = getattr(torch, dtype)
    info = torch.finfo(kind)
    fine = torch.tensor([0.0, -0.0, info.max, -info.max, info.smallest_normal, info.smallest_normal / 4], dtype=kind)
    for bad in (None, float("nan"), float("inf"), float("-inf")):
        tail = torch.zeros(1001, dtype=kind)
        if bad is not None:
            tail[777] = bad
        path = tmp_path / f"{dtype}-{bad}.safetensors"
        save_file({"a.fine": fine, "b.tail": tail}, str(path))
        header, data_start = read_safetensors_header(path)
        header.pop("__metadata__", None)
        if bad is None:
            _check_finite(path, header, data_start)
        else:
            with pytest.raises(InvalidAdapter, match="tensor 'b.tail' holds NaN or infinite values"):
                _check_finite(path, header, data_start)
