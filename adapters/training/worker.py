"""The training worker process: `python -m adapters.training.worker SPEC.json`.

It trains the spec's adapter and prints every event as one JSON line on standard output, flushed
at once; logs go to standard error. SIGTERM or SIGINT asks it to stop: it notices before the next
step, prints {"type": "cancelled"} and exits 0. It exits 0 after "succeeded" too, and 1 after a
final {"type": "failed", "message": ...} line.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

# Read by the math libraries when torch loads, so set before that import happens: without them
# each library starts a thread per core and a training job would crowd out serving.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")

logger = logging.getLogger("adapters.training.worker")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m adapters.training.worker SPEC.json\n")
        return 2
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Events get their own copy of standard output; the descriptor itself then points at standard
    # error, so that whatever a library prints (Python or C) cannot corrupt the event stream.
    events = _EventWriter(os.fdopen(os.dup(1), "w", encoding="utf-8"))
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        # Read as plain JSON first: the thread cap must be in place before anything imports torch.
        raw_spec = Path(argv[0]).read_text(encoding="utf-8")
        threads = max(1, int(json.loads(raw_spec).get("threads", 1)))
    except (OSError, ValueError, TypeError, AttributeError):
        logger.exception("unreadable training spec")
        events.emit({"type": "failed", "message": "the training spec cannot be read"})
        return 1
    for variable in _THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' own pool, and its fork warning

    stop_requested = False

    def request_stop(signum: int, frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    from adapters.errors import AdapterError
    from adapters.training.trainer import TrainingSpec, train

    try:
        spec = TrainingSpec.from_json(raw_spec)
        train(spec, events.emit, lambda: stop_requested)
    except AdapterError as exc:
        logger.info("training refused: %s", exc.message)
        events.emit({"type": "failed", "message": exc.message, **({"param": exc.param} if exc.param else {})})
        return 1
    except MemoryError:
        events.emit({"type": "failed", "message": "training ran out of memory; lower batch_size or max_length"})
        return 1
    except Exception:
        # The exception's own text may hold server paths: it goes to the log, not to the tenant.
        logger.exception("training failed")
        events.emit({"type": "failed", "message": "training failed unexpectedly; the server log has the details"})
        return 1
    return 0


class _EventWriter:
    """One JSON object per line on the given stream, flushed at once so the parent sees it live."""

    def __init__(self, stream):
        self._stream = stream

    def emit(self, event: dict[str, Any]) -> None:
        self._stream.write(json.dumps(event, allow_nan=False) + "\n")
        self._stream.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
