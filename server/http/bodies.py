"""What the request bodies of every surface share: a null that means "left out", and metadata's bounds."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, model_validator

# OpenAI's bounds on `metadata`, wherever a body carries it (completions, responses, batches, jobs).
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


class NullMeansAbsent(BaseModel):
    """A body whose fields sent as null count as left out, as OpenAI's server and its clients treat them
    (the openai client and lorax-client send null for a parameter not set)."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


def metadata_problem(metadata: dict[str, str] | None) -> str | None:
    """What is wrong with a body's `metadata` by OpenAI's bounds, or None."""
    if metadata is None:
        return None
    if len(metadata) > MAX_METADATA_PAIRS:
        return f"metadata holds at most {MAX_METADATA_PAIRS} key-value pairs; this has {len(metadata)}"
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            return f"metadata keys are at most {MAX_METADATA_KEY} characters and values {MAX_METADATA_VALUE}"
    return None


def bounded_metadata(metadata: dict[str, str] | None) -> dict[str, str] | None:
    """A body's `metadata` as given, once within OpenAI's bounds (a ValueError, so a 400, if not)."""
    if problem := metadata_problem(metadata):
        raise ValueError(problem)
    return metadata


# The type of a body's `metadata` field, checked against OpenAI's bounds as it is parsed.
Metadata = Annotated[dict[str, str] | None, AfterValidator(bounded_metadata)]
