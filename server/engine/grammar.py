"""The engine's check of an output constraint, for the gateway to run before a request starts.

It is vLLM's own (`validate_xgrammar_grammar`, the check its xgrammar backend makes as a request
arrives): whatever it takes, the engine takes; whatever it refuses is refused here first, with its
reason, so that a streamed request fails with a 400 rather than mid-stream.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from server.engine.protocol import OutputConstraint

# xgrammar prefixes its messages with a time and a source location.
_XGRAMMAR_PREFIX = re.compile(r"\[[\d:]+\] \S+\.cc:\d+: ")
MAX_REASON_CHARS = 500


@cache
def load() -> Any:
    """vLLM's validator, imported once (vLLM takes seconds to import; the engine has it already)."""
    from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

    return validate_xgrammar_grammar


def refusal(constraint: OutputConstraint) -> str | None:
    """Why the engine would refuse this constraint, or None when it takes it. Runs xgrammar's parser:
    call it off the event loop."""
    from vllm.sampling_params import SamplingParams

    try:
        load()(SamplingParams(structured_outputs=structured_outputs(constraint)))
    except Exception as exc:  # noqa: BLE001 - every refusal is the input's
        reason = str(exc).strip()
        cause = exc.__cause__
        if cause is not None and str(cause).strip() and str(cause) not in reason:
            reason = f"{reason}: {cause}"
        return _XGRAMMAR_PREFIX.sub("", reason)[:MAX_REASON_CHARS] or type(exc).__name__
    return None


def structured_outputs(constraint: OutputConstraint | None) -> Any:
    """vLLM's StructuredOutputsParams for a constraint (None for none); its backend compiles and
    caches the grammar."""
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if constraint.json_object:
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(
        json=constraint.json_schema,
        regex=constraint.regex,
        choice=list(constraint.choice) if constraint.choice is not None else None,
        grammar=constraint.grammar,
    )
