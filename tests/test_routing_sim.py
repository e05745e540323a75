"""bench.routing_sim: the simulated replicas, each routing policy, and the command line."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import replace

import pytest

from bench.routing_sim import (
    POLICIES,
    HashRing,
    SimConfig,
    Simulation,
    _Request,
    adapter_name,
    request_stream,
    simulate,
)
from bench.routing_sim_cli import build_parser, main

SMALL = SimConfig(adapters=200, requests=6_000, warmup=2_000)


def lru_misses(config: SimConfig) -> int:
    """Misses of one LRU cache of the config's size over its measured requests, replayed plainly."""
    _, ranks = request_stream(config)
    cache: OrderedDict[int, None] = OrderedDict()
    misses = 0
    for index, adapter in enumerate(ranks):
        if adapter in cache:
            cache.move_to_end(adapter)
            continue
        misses += index >= config.warmup
        if len(cache) >= config.max_models_per_replica:
            cache.popitem(last=False)
        cache[adapter] = None
    return misses


def test_one_replica_gives_every_policy_the_same_cold_loads() -> None:
    # Nothing waits at Ray's router (max_ongoing never reached), so every policy serves the
    # stream in arrival order on the one replica: the cold loads must agree exactly.
    base = replace(SMALL, replicas=1, max_ongoing=10**6, load_seconds=0.0)
    summaries = [simulate(replace(base, policy=policy)).summary for policy in POLICIES]
    assert {s["cold_per_request"] for s in summaries} == {lru_misses(base) / base.requests}
    assert {s["routed_max_over_mean"] for s in summaries} == {1.0}
    assert 0.3 < summaries[0]["cold_per_request"] < 1


def test_consistent_hash_sends_each_adapter_to_its_ring_owner() -> None:
    config = replace(SMALL, policy="consistent-hash", replicas=16)
    result = simulate(config)
    ring = HashRing(16, config.virtual_nodes)
    assert len(result.adapter_replicas) > 100
    for adapter, replicas in result.adapter_replicas.items():
        assert replicas == {ring.owner(adapter_name(adapter))}
    # The ring spreads adapters, not requests: Zipf(1)'s top adapter alone outweighs a replica's share.
    assert result.summary["routed_max_over_mean"] > 2


def test_bounded_loads_spread_the_hot_adapter_and_cap_the_busiest_replica() -> None:
    plain = simulate(replace(SMALL, policy="consistent-hash", replicas=16)).summary
    bounded = simulate(replace(SMALL, policy="consistent-hash-bounded", replicas=16)).summary
    assert bounded["top_adapter_replicas"] > 1
    assert bounded["routed_max_over_mean"] < 1.5 < plain["routed_max_over_mean"]
    assert bounded["wait_p99_s"] < plain["wait_p99_s"] / 10


def test_random_spreads_evenly_but_loads_more_than_affinity() -> None:
    by_policy = {p: simulate(replace(SMALL, policy=p, replicas=16)).summary for p in POLICIES}
    random_run = by_policy["random"]
    assert random_run["routed_max_over_mean"] < 1.15
    assert random_run["routed_cv"] < by_policy["consistent-hash"]["routed_cv"]
    for affine in ("ray-multiplex", "consistent-hash", "consistent-hash-bounded"):
        assert random_run["cold_per_request"] > by_policy[affine]["cold_per_request"] + 0.1, affine
    # With random routing every replica's cache sees the whole stream: one LRU's miss rate.
    alone = lru_misses(replace(SMALL, replicas=1)) / SMALL.requests
    assert random_run["loads_per_request"] == pytest.approx(alone, abs=0.03)


def test_ray_router_candidates_follow_multiplex_mixin() -> None:
    sim = Simulation(replace(SMALL, replicas=4, match_timeout=1.0))
    sim._ray_report(2, frozenset({5}))
    sim._ray_report(0, frozenset({7, 8}))
    sim._ray_report(1, frozenset({9}))
    sim._ray_report(3, frozenset({10}))
    request = _Request(adapter=5, arrival=0.0, measured=True)
    assert set(sim._ray_candidates(request, 0.0)) == {2}  # the replica that reports the model
    assert set(sim._ray_candidates(request, 0.1)) == {1, 2, 3}  # then the fewest models
    assert set(sim._ray_candidates(request, 2.5)) == {1, 2, 3}  # past the timeout: fewest, once
    assert set(sim._ray_candidates(request, 2.6)) == {0, 1, 2, 3}  # then any replica
    unknown = _Request(adapter=42, arrival=0.0, measured=True)
    assert set(sim._ray_candidates(unknown, 0.0)) == {1, 2, 3}
    again = _Request(adapter=42, arrival=0.0, measured=True)
    # A second request before any replica reports 42 gets no candidates on its first pass (Ray's
    # fallback set), and the fewest models on the next.
    assert set(sim._ray_candidates(again, 0.0)) == set()
    assert set(sim._ray_candidates(again, 0.0)) == {1, 2, 3}


def test_ray_spills_a_hot_adapter_only_when_its_replicas_are_full() -> None:
    hot = replace(SMALL, policy="ray-multiplex", replicas=8, zipf_alpha=3.0, report_delay=0.0)
    unbounded = simulate(replace(hot, max_ongoing=10**9)).summary  # ray.serve.llm's default
    bounded = simulate(replace(hot, max_ongoing=hot.slots)).summary
    assert unbounded["top_adapter_replicas"] == 1
    assert unbounded["routed_max_over_mean"] > 4
    assert bounded["top_adapter_replicas"] == 8
    assert bounded["routed_max_over_mean"] < 1.3


def test_report_delay_costs_duplicate_loads() -> None:
    base = replace(SMALL, policy="ray-multiplex", replicas=16)
    prompt = simulate(replace(base, report_delay=0.0)).summary
    late = simulate(replace(base, report_delay=2.0)).summary
    assert late["loads_per_request"] > prompt["loads_per_request"] + 0.05


def test_same_seed_same_numbers_other_seed_other_numbers() -> None:
    config = replace(SMALL, replicas=8)
    for policy in POLICIES:
        first = simulate(replace(config, policy=policy))
        assert simulate(replace(config, policy=policy)).summary == first.summary
        assert simulate(replace(config, policy=policy, seed=1)).summary != first.summary


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-ongoing", "4"], "--max-ongoing 4 is below --slots 16"),
        (["--policies", "ray-multiplex,nope"], "unknown policy nope"),
        (["--replicas", "0"], "--replicas must be at least 1"),
        (["--hash-balance", "1"], "--hash-balance must be above 1"),
        (["--replicas", "four"], "comma-separated int"),
    ],
)
def test_bad_flags_name_the_flag(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*flags, "--requests", "10", "--warmup", "0", "--quiet"])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_help_explains_every_flag() -> None:
    parser = build_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    text = parser.format_help()
    for flag in ("--policies", "--replicas", "--report-delay", "--max-models-per-replica", "--max-ongoing", "--seed"):
        assert flag in text


def test_cli_writes_json_and_plot(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--adapters", "100", "--requests", "2000", "--warmup", "500", "--replicas", "2,4"]
    flags += ["--report-delay", "0,1", "--quiet"]
    assert main([*flags, "--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "sim.png")]) == 0
    table = capsys.readouterr().out
    assert "| ray-multiplex, report delay 0 s | 2 |" in table
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["config"]["adapters"] == 100
    assert data["replica_counts"] == [2, 4] and data["report_delays_s"] == [0.0, 1.0]
    assert len(data["results"]) == 2 * (len(POLICIES) + 1)  # ray-multiplex once per delay
    assert (tmp_path / "sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*flags, "--json", str(tmp_path / "b.json")]) == 0
    assert (tmp_path / "b.json").read_bytes() == (tmp_path / "a.json").read_bytes()
