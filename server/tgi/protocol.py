"""TGI's and LoRAX's generate API: the request models, and how their parameters map to the engine's.

Names, defaults and limits follow TGI's router (`GenerateParameters` in router/src/lib.rs) and
LoRAX's, which adds `adapter_source`, `merged_adapters`, `api_token`, `ignore_eos_token`,
`presence_penalty`, `return_k_alternatives`, `response_format` and `apply_chat_template`. A
parameter this gateway cannot honour is refused with 422 (TGI's status for validation), never
dropped; a parameter outside both lists is refused too.
"""

from __future__ import annotations

import random
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError

from adapters.compose import MAX_INPUTS, SIGN_METHODS, Recipe
from adapters.errors import InvalidComposition
from server.engine.protocol import OutputConstraint
from server.http.bodies import NullMeansAbsent
from server.http.errors import InvalidRequest
from server.openai.protocol import MAX_NAME_CHARS, MAX_STOP, ModelName
from server.openai.structured import schema_text

MERGE_STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")  # LoRAX's
FOREIGN_SOURCES = ("hub", "local", "s3", "pbase")  # LoRAX's, besides this gateway's registry
MAX_SEED = 2**64 - 1
MAX_TEMPERATURE = 2.0  # vLLM's bound; TGI has none
Word = Annotated[str, Field(max_length=32)]  # a strategy's or method's name


class TgiInvalid(InvalidRequest):
    """A TGI request this gateway refuses: 422, as TGI answers validation errors."""

    status_code = 422


class UnsupportedTgiParameter(TgiInvalid):
    code = "unsupported_parameter"


class ForeignAdapterSource(InvalidRequest):
    """LoRAX's adapter_source names where LoRAX would download the adapter from; this gateway does not."""

    code = "unsupported_adapter_source"

    def __init__(self, source: str):
        super().__init__(
            f"adapter_source '{source[:32]}' is not read by this server, which serves only adapters registered "
            "with it: register the adapter first (POST /v1/adapters), then name it in adapter_id "
            "and leave adapter_source out",
            param="parameters.adapter_source",
        )


class _Model(NullMeansAbsent):
    # Both clients send null (lorax-client) or nothing (huggingface_hub) for a parameter not set.
    model_config = ConfigDict(extra="forbid")


class MergedAdapters(_Model):
    """LoRAX's per-request merge: `ids` composed by `merge_strategy` with `weights`."""

    ids: list[ModelName] = Field(min_length=1, max_length=MAX_INPUTS)
    weights: list[float] = Field(default_factory=list)
    merge_strategy: Word = "linear"
    density: float | None = None
    majority_sign_method: Word | None = None

    def recipe(self) -> Recipe:
        """The recipe adapters/compose.py composes by; InvalidComposition (400) says what is wrong."""
        strategy = self.merge_strategy
        if strategy not in MERGE_STRATEGIES:
            raise InvalidComposition(
                f"merge_strategy '{strategy[:32]}' is not one of {', '.join(MERGE_STRATEGIES)}",
                param="merged_adapters.merge_strategy",
            )
        weights = self.weights or [1.0] * len(self.ids)  # LoRAX's default: 1 each
        if len(weights) != len(self.ids):
            raise InvalidComposition(
                f"{len(self.ids)} ids and {len(weights)} weights; give one weight per adapter",
                param="merged_adapters.weights",
            )
        density = self.density
        if strategy == "linear":
            # lorax-client requires a density even for linear, which does not prune: 0 (LoRAX's
            # default when left out) and 1 (keep everything) both mean what linear does.
            if density not in (None, 0.0, 1.0):
                raise InvalidComposition(
                    "density applies to ties, dare_linear and dare_ties; linear keeps every value "
                    "(send density 1.0, or leave it out)",
                    param="merged_adapters.density",
                )
            density = None
        elif density is None or not 0 < density <= 1:
            raise InvalidComposition(
                f"merge_strategy '{strategy}' needs density, the share of values kept, in (0, 1]",
                param="merged_adapters.density",
            )
        sign = self.majority_sign_method
        if sign is not None and strategy not in ("ties", "dare_ties"):
            raise InvalidComposition(
                "majority_sign_method applies to ties and dare_ties only", param="merged_adapters.majority_sign_method"
            )
        if sign is not None and sign not in SIGN_METHODS:
            raise InvalidComposition(
                f"majority_sign_method must be {' or '.join(SIGN_METHODS)}",
                param="merged_adapters.majority_sign_method",
            )
        try:
            return Recipe.of(strategy, weights, density=density, majority_sign_method=sign)
        except InvalidComposition as exc:
            exc.param = f"merged_adapters.{exc.param}" if exc.param else "merged_adapters"
            raise


class Grammar(_Model):
    """TGI's `grammar`: output that fits a JSON schema, or a regex."""

    type: Literal["json", "regex"]
    value: dict[str, Any] | str

    def constraint(self) -> OutputConstraint:
        if self.type == "json":
            return OutputConstraint(json_schema=schema_text(self.value, "parameters.grammar.value"))
        if not isinstance(self.value, str):
            _refuse("grammar", "a regex grammar's value must be a string")
        return OutputConstraint(regex=self.value)


class GenerateParameters(_Model):
    """TGI's parameters with LoRAX's additions."""

    adapter_id: str | None = Field(None, min_length=1, max_length=200)
    adapter_source: str | None = Field(None, max_length=MAX_NAME_CHARS)
    merged_adapters: MergedAdapters | None = None
    api_token: str | None = None  # ignored: the Authorization header carries the key
    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    ignore_eos_token: bool = False
    return_full_text: bool = False
    stop: list[str] = Field(default_factory=list)
    truncate: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = None
    top_n_tokens: int | None = None
    grammar: Grammar | None = None
    return_k_alternatives: int | None = None
    response_format: Any = None
    apply_chat_template: bool = False

    @property
    def sampling(self) -> bool:
        """TGI's and LoRAX's rule (NextTokenChooser): sample when asked to, or when a warper is set.

        Otherwise greedy. A temperature of 0 is greedy even with do_sample, as in LoRAX.
        """
        if self.temperature == 0:
            return False
        warpers = (
            (self.temperature is not None and self.temperature != 1.0)
            or (self.top_k is not None and self.top_k != 0)
            or (self.top_p is not None and self.top_p < 1.0)
        )
        return self.do_sample or warpers

    def check(self, *, stream: bool) -> None:
        """Refuse, with 422 (400 for adapter_source), what cannot be honoured as asked."""
        if self.adapter_source is not None:
            raise ForeignAdapterSource(self.adapter_source)
        if self.adapter_id is not None and self.merged_adapters is not None:
            _refuse("adapter_id", "give at most one of adapter_id and merged_adapters")
        unsupported = {
            "typical_p": self.typical_p is not None,
            "watermark": self.watermark,
            "top_n_tokens": bool(self.top_n_tokens),
            "return_k_alternatives": self.return_k_alternatives is not None,
            "response_format": self.response_format is not None,
            "apply_chat_template": self.apply_chat_template,
        }
        for name, given in unsupported.items():
            if given:
                raise UnsupportedTgiParameter(
                    f"parameter '{name}' is not supported by this server; leave it out", param=f"parameters.{name}"
                )
        if self.best_of is not None and self.best_of != 1:
            if self.best_of < 1:
                _refuse("best_of", "`best_of` must be strictly positive")
            raise UnsupportedTgiParameter(
                "best_of > 1 is not supported by this server; send n separate requests with seeds",
                param="parameters.best_of",
            )
        if stream and self.decoder_input_details:
            _refuse("decoder_input_details", "`decoder_input_details` == true is not supported when streaming tokens")
        if self.temperature is not None and self.temperature < 0:
            _refuse("temperature", "`temperature` must be non-negative")
        if self.temperature is not None and self.temperature > MAX_TEMPERATURE:
            _refuse("temperature", f"`temperature` must be at most {MAX_TEMPERATURE} on this server (vLLM's bound)")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            _refuse("repetition_penalty", "`repetition_penalty` must be strictly positive")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if value is not None and not -2.0 <= value <= 2.0:
                _refuse(name, f"`{name}` must be >= -2.0 and <= 2.0")
        if self.top_k is not None and self.top_k <= 0:
            _refuse("top_k", "`top_k` must be strictly positive")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            _refuse("top_p", "`top_p` must be > 0.0 and <= 1.0")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            _refuse("max_new_tokens", "`max_new_tokens` must be strictly positive")
        if len(self.stop) > MAX_STOP:
            _refuse("stop", f"`stop` supports up to {MAX_STOP} stop sequences. Given: {len(self.stop)}")
        if any(not sequence for sequence in self.stop):
            _refuse("stop", "a stop sequence must not be empty")
        if self.truncate is not None and self.truncate <= 0:
            _refuse("truncate", "`truncate` must be strictly positive")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            _refuse("seed", f"`seed` must be between 0 and {MAX_SEED}")

    def sampling_seed(self) -> int | None:
        """The seed the generation runs with: the caller's, or a fresh one when sampling (TGI reports it)."""
        if not self.sampling:
            return None
        return self.seed if self.seed is not None else random.randrange(2**63)


class GenerateRequest(_Model):
    """POST /generate and /generate_stream; POST / also reads `stream`."""

    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool | None = None


def _refuse(name: str, message: str) -> None:
    raise TgiInvalid(message, param=f"parameters.{name}")


def parse_request(raw: bytes) -> GenerateRequest:
    """The body as a GenerateRequest; 400 for JSON that does not parse, 422 for the wrong fields."""
    import orjson

    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("request body is not valid JSON") from None
    try:
        request = GenerateRequest.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None
    if not request.inputs:
        raise TgiInvalid("`inputs` cannot be empty", param="inputs")
    return request


def _invalid(exc: ValidationError) -> TgiInvalid:
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(part) for part in first.get("loc", ())) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden" and param:
        return UnsupportedTgiParameter(f"parameter '{param}' is not supported by this server", param=param)
    if kind == "missing":
        return TgiInvalid(f"'{param}' is required", param=param)
    detail = first.get("msg", "invalid value").removeprefix("Value error, ")  # pydantic prefixes our own
    return TgiInvalid(f"invalid value for '{param}': {detail}" if param else detail, param=param)
