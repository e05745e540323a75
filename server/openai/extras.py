"""What evaluation harnesses and tuned applications send beyond plain sampling: vLLM's sampling
extensions, OpenAI's logit_bias, and OpenAI's bookkeeping fields, which change nothing here.

`ExtraFields` is mixed into both request models (server/openai/protocol.py); `engine_options`
turns it into SamplingOptions' fields once the model's vocabulary is known.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator

from server.http.bodies import MAX_METADATA_VALUE, bounded_metadata
from server.http.errors import InvalidRequest

MAX_LOGIT_BIAS = 300  # tokens one request may bias, as OpenAI bounds it
MAX_STOP_TOKEN_IDS = 64
MAX_IDENTIFIER_CHARS = 256

Bias = Annotated[float, Field(ge=-100.0, le=100.0)]


class ExtraFields(BaseModel):
    """Fields both OpenAI generation routes take besides the plain sampling ones."""

    # OpenAI's token biases: {"token id": bias from -100 to 100}.
    logit_bias: dict[str, Bias] | None = None
    # vLLM's names for its sampling extensions.
    top_k: int = Field(0, ge=-1)  # -1 or 0: every token
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # OpenAI's bookkeeping: accepted, and no-ops here (docs/evaluation.md says why).
    metadata: Annotated[
        dict[str, Annotated[str, Field(max_length=MAX_METADATA_VALUE)]] | None, AfterValidator(bounded_metadata)
    ] = None
    store: bool = False
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    prompt_cache_key: str | None = Field(None, max_length=MAX_IDENTIFIER_CHARS)
    safety_identifier: str | None = Field(None, max_length=MAX_IDENTIFIER_CHARS)

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias is None:
            return None
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased; this request biases {len(bias)}")
        for key in bias:
            if not key.isascii() or not key.isdigit() or len(key) > 10:
                raise ValueError(f'keys are token ids written as decimal strings, such as "50256"; got {key[:20]!r}')
        return bias

    @field_validator("store")
    @classmethod
    def _nothing_is_stored(cls, store: bool) -> bool:
        if store:
            raise ValueError(
                "this server stores no completions, so none can be listed or distilled later; "
                "leave store out or set it to false"
            )
        return store


def engine_options(body: ExtraFields, vocab_size: int) -> dict[str, Any]:
    """SamplingOptions' fields for these extras; 400 for a token id outside the vocabulary."""
    bias = tuple((int(token), value) for token, value in (body.logit_bias or {}).items())
    _check_ids([token for token, _ in bias], vocab_size, "logit_bias")
    stop_ids = tuple(body.stop_token_ids or ())
    _check_ids(stop_ids, vocab_size, "stop_token_ids")
    return {
        "top_k": max(body.top_k, 0),
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
        "logit_bias": bias,
        "stop_token_ids": stop_ids,
        "skip_special_tokens": body.skip_special_tokens,
        "include_stop_str": body.include_stop_str_in_output,
    }


def _check_ids(token_ids: Any, vocab_size: int, param: str) -> None:
    bad = next((token for token in token_ids if not 0 <= token < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(
            f"token id {bad} in {param} is not in this model's vocabulary (0 to {vocab_size - 1})", param=param
        )
