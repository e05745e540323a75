"""Where a fine-tuning job's worker runs: a process of its own here, or a Ray task.

Either way the worker is `python -m adapters.training.worker SPEC.json` (transformers and PEFT),
and the runner yields its events, one dict per line it prints. A checkpoint or the final adapter
is a folder: here it is read where the worker wrote it; from a Ray task, whose node may be another
machine, it arrives as a tar archive and is unpacked into the job's folder.

The worker gets --training-threads CPU threads and a lower scheduling priority, so that serving
keeps its cores.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

from adapters import confine
from server.ops.isolation import without_secrets

logger = logging.getLogger(__name__)

STOP_SECONDS = 5.0
WORKER_NICENESS = 10
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
# Events whose `path` names a folder the gateway needs: a checkpoint, and the adapter at the end.
FOLDER_EVENTS = {"checkpoint": "path", "succeeded": "adapter_dir"}


class Runner(Protocol):
    def run(self, spec: dict[str, Any], job_dir: Path, stop: asyncio.Event) -> AsyncIterator[dict[str, Any]]:
        """The worker's events; a folder event's path is made absolute under `job_dir`."""


def worker_env(threads: int) -> dict[str, str]:
    env = {**without_secrets(os.environ), "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
    return env


def _before_worker() -> Callable[[], None]:
    """What the worker does before it starts: a lower priority, and death with this process.

    A gateway killed outright must not leave its worker training on; nobody reads its events then.
    Started from the event loop's thread, which lives as long as the gateway does.
    """
    dies_with_parent = confine.parent_death_hook()

    def prepare() -> None:
        os.nice(WORKER_NICENESS)
        dies_with_parent()

    return prepare


class ProcessRunner:
    """The worker as a child process of this gateway."""

    def __init__(self, threads: int):
        self.threads = threads

    async def run(self, spec: dict[str, Any], job_dir: Path, stop: asyncio.Event) -> AsyncIterator[dict[str, Any]]:
        spec_path = job_dir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        with open(job_dir / "worker.log", "wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "adapters.training.worker",
                str(spec_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=worker_env(self.threads),
                preexec_fn=_before_worker(),
                limit=1 << 20,
            )
        assert process.stdout is not None
        stopper = asyncio.create_task(_stop_when(stop, process))
        try:
            async for line in process.stdout:
                event = _parse(line)
                if event is not None:
                    yield _absolute(event, Path(spec["out_dir"]))
            await process.wait()
            if process.returncode not in (0, None) and not stop.is_set():
                yield {"type": "failed", "message": f"the training process exited with status {process.returncode}"}
        finally:
            stopper.cancel()
            await _terminate(process)


async def _stop_when(stop: asyncio.Event, process: asyncio.subprocess.Process) -> None:
    await stop.wait()
    await _terminate(process)


async def _terminate(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    process.terminate()  # the worker stops at its next step and reports "cancelled"
    try:
        await asyncio.wait_for(process.wait(), STOP_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except ValueError:
        logger.warning("fine-tuning worker printed a line that is not an event")
        return None
    return event if isinstance(event, dict) and isinstance(event.get("type"), str) else None


def _absolute(event: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    key = FOLDER_EVENTS.get(event["type"])
    if key and isinstance(event.get(key), str):
        event = {**event, "folder": out_dir / event[key]}
    return event


def pack(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                tar.add(path, arcname=path.name)
    return buffer.getvalue()


def unpack(archive: bytes, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r") as tar:
        tar.extractall(folder, filter="data")


class RayRunner:
    """The worker inside a Ray task with its own CPUs (`--training-cpus`), on any node of the cluster."""

    def __init__(self, threads: int, cpus: float):
        self.threads = threads
        self.cpus = cpus

    async def run(self, spec: dict[str, Any], job_dir: Path, stop: asyncio.Event) -> AsyncIterator[dict[str, Any]]:
        import ray

        total = ray.cluster_resources().get("CPU", 0.0)
        if total < self.cpus:
            yield {
                "type": "failed",
                "message": f"the Ray cluster has {total:g} CPUs in all and --training-cpus asks for {self.cpus:g}",
            }
            return
        inputs = {key: Path(spec[key]).read_bytes() for key in ("training_file", "validation_file") if spec.get(key)}
        yield {
            "type": "message",
            "level": "info",
            "message": f"Waiting for Ray to start the job with {self.cpus:g} CPUs",
        }
        task = ray.remote(_train_in_ray_task).options(num_cpus=self.cpus, num_returns="streaming", max_retries=0)
        stream = task.remote(spec, inputs, self.threads)
        stopper = asyncio.create_task(_cancel_when(stop, stream))
        try:
            async for ref in stream:
                event = await ref
                archive = event.pop("archive", None)
                key = FOLDER_EVENTS.get(event["type"])
                if archive is not None and key:
                    folder = Path(spec["out_dir"]) / event[key]
                    await asyncio.to_thread(unpack, archive, folder)
                    event["folder"] = folder
                yield event
        except ray.exceptions.TaskCancelledError:
            if not stop.is_set():
                raise
        finally:
            stopper.cancel()
            if not stop.is_set():
                ray.cancel(stream, force=True)


async def _cancel_when(stop: asyncio.Event, stream) -> None:
    import ray

    await stop.wait()
    ray.cancel(stream)


def _train_in_ray_task(spec: dict[str, Any], inputs: dict[str, bytes], threads: int):
    """Runs on a Ray worker: the same worker process, its folders sent back as archives."""
    import subprocess
    import tempfile

    import ray

    context = ray.get_runtime_context()
    cpus = context.get_assigned_resources().get("CPU", 0)
    yield {
        "type": "message",
        "level": "info",
        "message": f"Training as a Ray task on node {context.get_node_id()} with {cpus:g} CPUs",
    }
    with tempfile.TemporaryDirectory(prefix="lora-gateway-ft-") as scratch:
        root = Path(scratch)
        local = dict(spec, out_dir=str(root / "out"))
        for key, data in inputs.items():
            (root / key).write_bytes(data)
            local[key] = str(root / key)
        (root / "spec.json").write_text(json.dumps(local))
        process = subprocess.Popen(
            [sys.executable, "-m", "adapters.training.worker", str(root / "spec.json")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=worker_env(threads),
            preexec_fn=_before_worker(),
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                event = _parse(line)
                if event is None:
                    continue
                key = FOLDER_EVENTS.get(event["type"])
                if key and isinstance(event.get(key), str):
                    event["archive"] = pack(root / "out" / event[key])
                yield event
            if process.wait() != 0:
                yield {"type": "failed", "message": f"the training process exited with status {process.returncode}"}
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    process.kill()
