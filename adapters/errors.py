"""The adapter layer's errors, in its own types.

They carry a message that says what was wrong and, where one field is to blame, its name
(`param`). They carry no HTTP status: `server/http/errors.py` maps each type to a status and an
OpenAI error code, in one place.
"""

from __future__ import annotations

_MAX_ECHOED_NAME = 128


class AdapterError(Exception):
    """Base of every error raised under `adapters/`."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class AdapterNotFound(AdapterError):
    """No adapter by that name that this caller may use; missing and not allowed look the same."""

    def __init__(self, name: str):
        self.name = name
        shown = name if len(name) <= _MAX_ECHOED_NAME else name[:_MAX_ECHOED_NAME] + "..."
        super().__init__(f"The model '{shown}' does not exist or you do not have access to it.", param="model")


class InvalidAdapterName(AdapterError):
    """A name that adapters may not have."""


class InvalidAdapter(AdapterError):
    """The adapter's files cannot be served; the message says what is wrong."""


class AdapterTooLarge(InvalidAdapter):
    """The adapter's files exceed a size limit."""


class AdapterRejected(InvalidAdapter):
    """The engine refused the adapter's files."""


class InvalidComposition(AdapterError):
    """Adapters cannot be composed as asked; the message says why and what would work."""


class MergeFailed(AdapterError):
    """An adapter cannot be merged into the base model's weights; the message says why."""


class Unavailable(AdapterError):
    """A backing service cannot be reached; the same call may succeed later."""

    def __init__(self, message: str, *, retry_after: float = 2.0):
        super().__init__(message)
        self.retry_after = retry_after


class CatalogUnavailable(Unavailable):
    """The catalog's database cannot be reached, so nothing can be changed just now."""


class StoreUnavailable(Unavailable):
    """The adapter store cannot be reached, so an adapter not cached here cannot be fetched."""


class ConverterBusy(Unavailable):
    """Every sandbox that converts pickled weights is in use; the same upload may succeed shortly."""


class QuotaExceeded(AdapterError):
    """An owner is at one of its limits (adapters, pins, merges, queued jobs); nothing was taken.

    `limit` names the tenant limit, as `PATCH /v1/tenants/NAME` spells it.
    """

    def __init__(self, message: str, *, limit: str, retry_after: float = 60.0):
        super().__init__(message)
        self.limit = limit
        self.retry_after = retry_after


class StorageQuotaExceeded(QuotaExceeded):
    """An owner's bytes kept (training files) would pass its limit; nothing was stored."""


class OwnerNotFound(AdapterError):
    """A row for a tenant the catalog no longer holds (deleted meanwhile); nothing was written."""

    def __init__(self, owner: str):
        super().__init__(f"no tenant named '{owner[:64]}'; it was deleted")


class JobGone(AdapterError):
    """A fine-tuning job that is no longer running (deleted with its tenant, or ended); nothing was written."""

    def __init__(self, job_id: str):
        super().__init__(f"fine-tuning job {job_id[:64]} was deleted or has ended")


class InvalidTrainingFile(AdapterError):
    """A fine-tuning data file cannot be trained on; the message names the line and what would be right."""


class InvalidTrainingSettings(AdapterError):
    """Fine-tuning hyperparameters or LoRA settings that are invalid for this base; `param` names the field."""
