from __future__ import annotations

import pytest

from adapters.errors import AdapterTooLarge, InvalidAdapter
from adapters.store import copy_folder
from adapters.validate import validate_adapter
from server.http.errors import http_status
from tests.adapter_files import BAD_CASES, TINY_BASE, bad_adapters, make_adapter


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
