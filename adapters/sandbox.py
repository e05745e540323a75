"""Pickled tensors loaded in a short-lived, locked-down process: the only way a pickle is read.

A pickle runs code while it is loaded. The child reads with adapters/torch_file.py: an unpickler
that resolves only torch's tensor-rebuilding functions, its storage types and OrderedDict, each
replaced by an inert stand-in, and refuses any other global by name. It never imports torch (a
child starts in a few hundredths of a second, where torch took two), so torch's own loader, and the holes
its allow-list has had (CVE-2025-32434, CVE-2026-24747), are out of the picture. In case this
unpickler ever has a hole of its own, the load runs in a child process that:

- is `python -I` (no environment variables, user site or script folder) with a minimal
  environment, in a new session, with every descriptor closed but its three standard ones;
- gets the file as its standard input and writes safetensors to its standard output, which is a
  file in a private folder of the parent's: it never opens a path;
- has limits on address space, CPU seconds, bytes it may write, and open descriptors (none new),
  and is killed with its session past a wall-clock timeout, and by the kernel when its parent dies;
- leaves the network (a new, empty network namespace: as root directly, otherwise inside an
  unprivileged user namespace where the kernel allows one) and is chrooted into an empty folder
  when either namespace or root allows it; as root it also drops to `nobody`;
- runs the load under no new privileges and a seccomp filter (adapters/confine.py) that lets
  through only reading and writing its three descriptors, memory, time and exit: it opens no
  file or socket, starts no process or thread, and signals or traces no other process. That
  filter holds for any user, root or not; without it the child refuses to load anything.

The parent reads back only safetensors, a format with no code in it, and checks that it is a
flat mapping of names to floating-point tensors. The child checks the same before writing, so
the parent never sees a nested dict, a number or a string that a pickle held.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters import confine
from adapters.errors import AdapterTooLarge, ConverterBusy, InvalidAdapter

logger = logging.getLogger(__name__)

_REFUSED = 3  # the child's exit status for a file it refuses; the reason is JSON on stderr
_MAX_ECHOED_KEY = 80
_STDERR_READ = 64 * 1024
_NOBODY = 65534
# The child runs this very copy of the code: `python -I` ignores PYTHONPATH, and `-m` could find
# another installation of the package than the parent's.
_CODE_ROOT = str(Path(__file__).resolve().parents[1])
_CHILD = "import sys; sys.path.insert(0, sys.argv[1]); from adapters.sandbox import child_entry; child_entry()"


@dataclass(frozen=True)
class SandboxLimits:
    """What one load may use. Memory grows with the file: it is read, loaded and written once each."""

    max_input_bytes: int = 512 * 1024 * 1024
    base_memory_bytes: int = 128 * 1024 * 1024  # python itself
    memory_per_input_byte: int = 6
    cpu_seconds: int = 60
    wall_seconds: float = 120.0
    max_tensors: int = 100_000
    concurrent_loads: int = 2

    def memory_bytes(self, input_bytes: int) -> int:
        return self.base_memory_bytes + self.memory_per_input_byte * input_bytes

    def output_bytes(self, input_bytes: int) -> int:
        # Tensor data cannot grow; the margin covers the header and a short error report.
        return 2 * input_bytes + (1 << 20)


DEFAULT_LIMITS = SandboxLimits()
_slots_lock = threading.Lock()
_slots: dict[int, threading.BoundedSemaphore] = {}


def check_confinement() -> None:
    """Raise InvalidAdapter unless the child can confine itself with seccomp (libseccomp, pyseccomp)."""
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, RuntimeError):  # RuntimeError: no libseccomp on this host
        raise InvalidAdapter(
            "this server cannot confine the loader of pickled weights (it needs libseccomp and the pyseccomp "
            "package); send safetensors"
        ) from None


def loader_problem() -> str | None:
    """Why pickled weights cannot be loaded safely here (for a warning at start), or None."""
    try:
        check_confinement()
    except InvalidAdapter as exc:
        return exc.message
    return None


def load_pickled_tensors(path: Path, label: str, limits: SandboxLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The flat {name: tensor} dict pickled in `path`, loaded in a sandboxed process.

    `label` names the file in messages (never the path). Raises InvalidAdapter for a file that is
    not such a dict or that carries code, AdapterTooLarge past the size limit, and ConverterBusy
    when every sandbox slot stays busy.
    """
    size = path.stat().st_size
    if size > limits.max_input_bytes:
        raise AdapterTooLarge(f"{label} is {size} bytes; the limit is {limits.max_input_bytes} bytes")
    check_confinement()
    slots = _slots_for(limits.concurrent_loads)
    if not slots.acquire(timeout=limits.wall_seconds):
        raise ConverterBusy("every sandbox that converts pickled weights is busy; try again shortly", retry_after=5)
    try:
        with tempfile.TemporaryDirectory(prefix="lora-gateway-sandbox-") as private:
            return _run_child(path, label, size, limits, Path(private))
    finally:
        slots.release()


def _slots_for(count: int) -> threading.BoundedSemaphore:
    with _slots_lock:
        return _slots.setdefault(count, threading.BoundedSemaphore(count))


def _run_child(path: Path, label: str, size: int, limits: SandboxLimits, private: Path) -> dict[str, Any]:
    jail = private / "jail"  # the child's cwd (and root, as root): empty, and not writable by nobody
    jail.mkdir(mode=0o755)
    output_path, errors_path = private / "out.safetensors", private / "errors.txt"
    plan = {
        "memory": limits.memory_bytes(size),
        "cpu": limits.cpu_seconds,
        "output": limits.output_bytes(size),
        "input": size,
        "max_tensors": limits.max_tensors,
        "jail": str(jail),
        "uid": _NOBODY if os.geteuid() == 0 else None,
        "parent": os.getpid(),
    }
    env = {"PATH": os.defpath, "LC_ALL": "C.UTF-8", "HOME": "/nonexistent"}
    env |= {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    with (
        open(os.open(path, flags), "rb") as source,
        open(output_path, "wb") as output,
        open(errors_path, "wb") as errors,
    ):
        child = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD, _CODE_ROOT, json.dumps(plan)],
            stdin=source,
            stdout=output,
            stderr=errors,
            cwd=jail,
            env=env,
            close_fds=True,
            start_new_session=True,
        )
        try:
            status = child.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            _kill_session(child)
            raise InvalidAdapter(
                f"{label} did not load within {limits.wall_seconds:g} s; LoRA weights load in seconds"
            ) from None
        except BaseException:
            _kill_session(child)
            raise
    report = _read_report(errors_path)
    if status == 0:
        tensors = _read_output(output_path, label, limits)
        logger.info(
            "loaded %s in a sandbox (%s): %d tensors", label, ", ".join(report.get("protections", [])), len(tensors)
        )
        return tensors
    if status == _REFUSED and "reason" in report:
        raise InvalidAdapter(f"{label}: {_refusal_message(report, limits.memory_bytes(size))}")
    raise InvalidAdapter(f"{label} could not be loaded as pickled tensors: {_crash_reason(status, limits, size)}")


def _kill_session(child: subprocess.Popen) -> None:
    """Kill the child and its session while the child is unreaped, so that its id is still its own."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.wait()


def _read_report(errors_path: Path) -> dict[str, Any]:
    """The child's last JSON line on stderr, or {} when it left none."""
    with errors_path.open("rb") as errors:
        errors.seek(max(0, errors_path.stat().st_size - _STDERR_READ))
        lines = errors.read().decode("utf-8", "replace").strip().splitlines()
    for line in reversed(lines):
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(report, dict):
            return report
    return {}


def _read_output(output_path: Path, label: str, limits: SandboxLimits) -> dict[str, Any]:
    """Parse the child's safetensors and check its shape again: names to floating-point tensors."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(output_path.read_bytes())
    except (SafetensorError, ValueError, OSError):
        raise InvalidAdapter(f"{label} could not be loaded as pickled tensors") from None
    if not tensors:
        raise InvalidAdapter(f"{label}: the pickled weights hold no tensors")
    if len(tensors) > limits.max_tensors:
        raise InvalidAdapter(f"{label}: the pickled weights hold over {limits.max_tensors} tensors")
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise InvalidAdapter(f"{label}: tensor {_shown(name)} is not floating point")
    return tensors


def _shown(key: object) -> str:
    text = repr(key)
    return text if len(text) <= _MAX_ECHOED_KEY else text[:_MAX_ECHOED_KEY] + "..."


def _refusal_message(report: dict[str, Any], memory_bytes: int) -> str:
    reason, detail = report.get("reason"), str(report.get("detail"))[:120]  # the child's words, bounded
    key = _shown(report.get("key"))
    messages = {
        "code": f"the pickled weights call {detail}, which is code; it was not run. Only tensors are "
        "accepted: save a plain state dict of tensors, or safetensors",
        "unreadable": "not a readable pickled state dict (a file written by torch.save)",
        "not_a_dict": f"the pickled weights hold {detail}, not a dict of tensor names to tensors",
        "key_type": f"the pickled weights have a key of type {detail}; tensor names are strings",
        "nested": f"the pickled weights nest a dict under {key}; a flat dict of name to tensor is expected",
        "not_a_tensor": f"the pickled weights hold {detail} under {key}, not a tensor",
        "dtype": f"tensor {key} has dtype {detail}; LoRA weights are floating point",
        "layout": f"tensor {key} is {detail}; only dense tensors are accepted",
        "empty": "the pickled weights hold no tensors",
        "too_many": f"the pickled weights hold over {detail} tensors",
        "memory": f"loading the pickled weights needs more than the sandbox's {memory_bytes >> 20} MiB of memory",
        "too_large": "the pickled weights are larger once loaded than the sandbox allows",
        "confinement": "this server cannot confine the loader of pickled weights here (seccomp is unavailable); "
        "send safetensors",
    }
    return messages.get(str(reason), "not a readable pickled state dict")


def _crash_reason(status: int, limits: SandboxLimits, size: int) -> str:
    if status == -signal.SIGXCPU:
        return f"it needed over {limits.cpu_seconds} s of CPU"
    if status == -signal.SIGXFSZ:
        return "it is larger once loaded than the file itself"
    if status in (-signal.SIGKILL, -signal.SIGSEGV, -signal.SIGABRT, -signal.SIGBUS):
        return f"the loader stopped (over {limits.memory_bytes(size) >> 20} MiB of memory, or a corrupt file)"
    return "the loader failed"


# -- the child ------------------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, reason: str, detail: object = None, key: object = None):
        super().__init__(reason)
        self.report = {"reason": reason, "detail": detail, "key": None if key is None else str(key)[:200]}


def child_entry() -> None:
    """`python -I -c _CHILD ROOT PLAN`: the child process."""
    sys.exit(_child_main(json.loads(sys.argv[-1])))


def _child_main(plan: dict[str, Any]) -> int:
    """Limit this process, then read standard input as a torch.save file of tensors."""
    isolated = _isolate()  # first: a user namespace needs a process that has started no thread
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_AS, plan["memory"])
    _limit(resource.RLIMIT_FSIZE, plan["output"])
    # The soft limit sends SIGXCPU; the hard one, a second later, SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (plan["cpu"], plan["cpu"] + 1))
    try:
        from adapters import torch_file
    except MemoryError:
        return _refuse(_Refused("memory"))
    except ImportError as exc:
        if "failed to map" not in str(exc) and "memory" not in str(exc).lower():
            raise
        return _refuse(_Refused("memory"))  # a shared library that did not fit in RLIMIT_AS
    try:
        import pyseccomp  # noqa: F401  (now: after the chroot nothing can be imported)
    except (ImportError, RuntimeError) as exc:
        return _refuse(_Refused("confinement", str(exc)))
    try:
        torch_file.warm_up()
    except MemoryError:
        return _refuse(_Refused("memory"))
    try:
        protections = _lock_down(plan, isolated)
    except confine.ConfinementUnavailable as exc:
        return _refuse(_Refused("confinement", str(exc)))
    try:
        data = sys.stdin.buffer.read(plan["input"] + 1)
        tensors = _load_flat_tensors(data, plan["max_tensors"], plan["output"])
        del data
        parts = torch_file.safetensors_bytes(tensors)
    except _Refused as refused:
        return _refuse(refused)
    except MemoryError:
        return _refuse(_Refused("memory"))
    try:
        for part in parts:
            sys.stdout.buffer.write(part)
        sys.stdout.buffer.flush()
    except OSError:  # EFBIG: over RLIMIT_FSIZE
        return _refuse(_Refused("too_large"))
    sys.stderr.write(json.dumps({"protections": protections}) + "\n")
    return 0


def _limit(kind: int, value: int) -> None:
    resource.setrlimit(kind, (value, value))


def _isolate() -> list[str]:
    """Leave the network while this process is still single-threaded; [] where the kernel refuses."""
    try:
        return [confine.leave_network()]
    except (confine.ConfinementUnavailable, OSError):
        return []


def _lock_down(plan: dict[str, Any], isolated: list[str]) -> list[str]:
    """Cut this process off from everything but its three descriptors; returns what was applied.

    Raises confine.ConfinementUnavailable when the seccomp filter, the one layer that holds for
    every user, cannot be installed.
    """
    applied = ["rlimits", *isolated]
    as_root = plan["uid"] is not None
    if as_root or isolated:  # chroot needs root, or the capabilities of a new user namespace
        try:
            os.chroot(plan["jail"])
            os.chdir("/")
            applied.append("chroot")
        except OSError:
            pass
    if isolated and not as_root:
        confine.drop_capabilities()  # those the user namespace granted: used for chroot, now gone
    confine.no_new_privileges()
    applied.append("no new privileges")
    if as_root:
        os.setgroups([])
        os.setgid(plan["uid"])
        os.setuid(plan["uid"])
        applied.append("nobody")
    confine.die_with_parent(plan["parent"])  # after the change of user, which would clear it
    applied.append("dies with its parent")
    _limit(resource.RLIMIT_NPROC, 0)  # counted per user: no new process or thread
    os.closerange(3, 1 << 16)
    _limit(resource.RLIMIT_NOFILE, 3)  # no descriptor can be opened beyond stdin, stdout, stderr
    confine.allow_only(confine.READ_WRITE_ONLY)
    applied.append("seccomp")
    return applied


def _load_flat_tensors(data: bytes, max_tensors: int, max_bytes: int) -> dict[str, tuple]:
    """{name: (safetensors dtype, shape, bytes)} of the flat dict of float tensors in `data`.

    Raises _Refused naming the first thing that is not such a dict, or MemoryError.
    """
    from adapters import torch_file

    try:
        loaded = torch_file.load(data)
    except torch_file.CodeInPickle as code:
        raise _Refused("code", code.name) from None
    except MemoryError:
        raise
    except Exception:  # a broken file raises any of the pickle, zip and struct modules' errors
        raise _Refused("unreadable") from None
    content = loaded.obj
    if not isinstance(content, dict):
        raise _Refused("not_a_dict", type(content).__name__)
    if not content:
        raise _Refused("empty")
    if len(content) > max_tensors:
        raise _Refused("too_many", max_tensors)
    tensors = {}
    budget = max_bytes
    for key, value in content.items():
        if not isinstance(key, str):
            raise _Refused("key_type", type(key).__name__)
        if isinstance(value, dict):
            raise _Refused("nested", key=key)
        if isinstance(value, torch_file.Unsupported):
            raise _Refused("layout", value.what, key)
        if not isinstance(value, torch_file.TensorRecord):
            raise _Refused("not_a_tensor", type(value).__name__, key)
        if value.lazy_sign:
            raise _Refused("layout", "a lazily negated or conjugated view", key)
        if value.storage.type.safetensors is None:
            raise _Refused("dtype", value.storage.type.dtype, key)
        try:
            tensors[key] = loaded.tensor_bytes(value, budget)
        except torch_file.Malformed:
            raise _Refused("unreadable") from None
        except torch_file.TooLarge:  # past the output's limit
            raise _Refused("too_large") from None
        budget -= len(tensors[key][2])
    return tensors


def _refuse(refused: _Refused) -> int:
    sys.stderr.write(json.dumps(refused.report) + "\n")
    sys.stderr.flush()
    return _REFUSED


if __name__ == "__main__":
    child_entry()
