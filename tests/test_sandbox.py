"""adapters/sandbox.py: pickles load only as flat dicts of tensors, in a process cut off from everything."""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as safetensors_load

from adapters import sandbox, torch_file
from adapters.errors import AdapterTooLarge, ConverterBusy, InvalidAdapter
from adapters.sandbox import SandboxLimits, load_pickled_tensors
from server.http.errors import from_adapter_error

ROOT = str(Path(__file__).resolve().parents[1])


class LeavesATrace:
    """A pickle payload: loading it would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsPython:
    """A pickle payload that calls exec, the other classic."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def saved(obj, path: Path, *, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def test_a_flat_state_dict_loads_as_the_same_tensors(tmp_path):
    tensors = {
        "a": torch.randn(4, 3),
        "b": torch.randn(2, 5).to(torch.bfloat16),
        "c": torch.randn(3).to(torch.float16),
        "view": torch.randn(6, 6)[:, 1:3],  # a view into a larger storage: saved as its own tensor
    }
    loaded = load_pickled_tensors(saved(tensors, tmp_path / "w.bin"), "adapter_model.bin")
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)


@pytest.mark.parametrize(
    "write",
    [
        lambda path, marker: saved({"a": torch.zeros(2), "x": LeavesATrace(marker)}, path),
        lambda path, marker: saved({"a": RunsPython(marker)}, path, legacy=True),
        lambda path, marker: path.write_bytes(pickle.dumps({"a": LeavesATrace(marker)}, protocol=2)),
    ],
    ids=["torch-save-os-system", "legacy-exec", "raw-pickle"],
)
def test_a_pickle_that_carries_code_is_refused_and_its_code_never_runs(tmp_path, write):
    marker = tmp_path / "the-payload-ran"
    path = tmp_path / "evil.bin"
    write(path, marker)
    with pytest.raises(InvalidAdapter) as refused:
        load_pickled_tensors(path, "adapter_model.bin")
    message = refused.value.message
    assert message.startswith("adapter_model.bin: ") and "pickled" in message
    assert "not run" in message or "nothing in them was run" in message
    assert "weights_only=False" not in message  # torch's own advice is never passed on
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        ({"a": {"b": torch.zeros(2)}}, "nest a dict under 'a'"),
        ({"a": torch.zeros(2), "step": 3}, "hold int under 'step', not a tensor"),
        ({"a": torch.zeros(2, dtype=torch.int64)}, "dtype int64"),
    ],
    ids=["nested", "number", "int-tensor"],
)
def test_anything_but_a_flat_dict_of_float_tensors_is_refused(tmp_path, content, phrase):
    with pytest.raises(InvalidAdapter, match=phrase):
        load_pickled_tensors(saved(content, tmp_path / "w.bin"), "adapter_model.bin")


def test_a_file_that_is_no_torch_save_is_refused(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidAdapter, match="not a readable pickled state dict"):
        load_pickled_tensors(path, "adapter_model.bin")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ({"a": {"b": torch.zeros(2)}}, "nested"),
        ({"a": "text"}, "not_a_tensor"),
        ({1: torch.zeros(2)}, "key_type"),
        ({"a": torch.zeros(2, dtype=torch.bool)}, "dtype"),
        ({"a": torch.zeros(2).to_sparse()}, "layout"),
        ([torch.zeros(2)], "not_a_dict"),
        ({}, "empty"),
        ({str(i): torch.zeros(1) for i in range(11)}, "too_many"),
    ],
)
def test_the_childs_checks_refuse_each_shape_but_a_flat_dict(content, reason):
    # The same checks the child runs, here in this process to keep the suite fast.
    data = io.BytesIO()
    torch.save(content, data)
    with pytest.raises(sandbox._Refused) as refused:
        sandbox._load_flat_tensors(data.getvalue(), max_tensors=10, max_bytes=1 << 20)
    assert refused.value.report["reason"] == reason
    assert sandbox._refusal_message(refused.value.report, 1 << 30) != "not a readable pickled state dict"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("data", [b"\x80\x04K\x01.", b"\xff" * 64, b""], ids=["bare-int", "garbage", "empty"])
def test_the_childs_checks_refuse_what_is_no_torch_save(data):
    with pytest.raises(sandbox._Refused) as refused:
        sandbox._load_flat_tensors(data, max_tensors=10, max_bytes=1 << 20)
    assert refused.value.report["reason"] == "unreadable"


def test_an_oversized_file_is_refused_before_any_process_starts(tmp_path, monkeypatch):
    path = saved({"a": torch.zeros(1000)}, tmp_path / "w.bin")
    monkeypatch.setattr(subprocess, "Popen", None)  # would fail loudly if a child were started
    with pytest.raises(AdapterTooLarge, match="the limit is 1000 bytes"):
        load_pickled_tensors(path, "adapter_model.bin", SandboxLimits(max_input_bytes=1000))


def test_a_load_past_the_wall_clock_is_killed(tmp_path):
    # Transposed, a million elements are copied out two at a time: a second or so of CPU.
    path = saved({"a": torch.zeros(2, 500_000).t()}, tmp_path / "w.bin")
    with pytest.raises(InvalidAdapter, match="did not load within 0.2 s"):
        load_pickled_tensors(path, "adapter_model.bin", SandboxLimits(wall_seconds=0.2))


def test_a_load_past_the_memory_limit_is_refused(tmp_path):
    path = saved({"a": torch.zeros(5_000_000)}, tmp_path / "w.bin")  # 20 MB, read and copied out
    limits = SandboxLimits(base_memory_bytes=40 << 20, memory_per_input_byte=0)
    with pytest.raises(InvalidAdapter, match="more than the sandbox's 40 MiB of memory"):
        load_pickled_tensors(path, "adapter_model.bin", limits)


def test_past_the_concurrent_loads_an_upload_gets_a_503_to_retry(tmp_path):
    path = saved({"a": torch.zeros(2)}, tmp_path / "w.bin")
    limits = SandboxLimits(concurrent_loads=1, wall_seconds=0.2)
    slots = sandbox._slots_for(1)
    slots.acquire()  # the one sandbox is busy
    try:
        with pytest.raises(ConverterBusy) as busy:
            load_pickled_tensors(path, "adapter_model.bin", limits)
    finally:
        slots.release()
    answer = from_adapter_error(busy.value)
    assert answer.status_code == 503 and answer.code == "converter_busy" and answer.headers["Retry-After"] == "5"


def test_this_machine_can_confine_the_loader():
    assert sandbox.loader_problem() is None


_PROBE = """
import encodings.idna, json, os, socket, sys  # imported before the lock-down, as the child's are
sys.path.insert(0, sys.argv[4])  # this checkout's code: python -I ignores PYTHONPATH
import pyseccomp
from adapters import sandbox

jail, outside, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
plan = {"jail": jail, "uid": 65534 if os.geteuid() == 0 else None, "parent": os.getppid()}
applied = sandbox._lock_down(plan, sandbox._isolate())
results = {"applied": applied, "uid": os.getuid()}

def attempt(name, action):
    try:
        action()
        results[name] = "allowed"
    except OSError:
        results[name] = "refused"

def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

def connect():
    os.close(0)  # frees a descriptor below the limit
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass

attempt("read outside", lambda: open(outside).close())
attempt("create a file", lambda: open("probe.txt", "w").close())
attempt("open a socket", lambda: socket.socket().close())
attempt("fork", fork)
attempt("connect over loopback", connect)
sys.stdout.write(json.dumps(results))
"""


def test_the_locked_down_child_reaches_nothing(tmp_path):
    jail = tmp_path / "jail"
    jail.mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        probe = subprocess.run(
            [sys.executable, "-I", "-c", _PROBE, str(jail), str(outside), str(listener.getsockname()[1]), ROOT],
            capture_output=True,
            text=True,
            cwd=jail,
            timeout=60,
        )
    assert probe.returncode == 0, probe.stderr
    results = json.loads(probe.stdout)
    attempts = ("read outside", "create a file", "open a socket", "fork", "connect over loopback")
    assert {name: results[name] for name in attempts} == dict.fromkeys(attempts, "refused")
    assert list(jail.iterdir()) == []
    assert {"no new privileges", "dies with its parent", "seccomp"} <= set(results["applied"])
    if os.geteuid() == 0:
        assert {"no network", "chroot", "nobody"} <= set(results["applied"])
        assert results["uid"] == 65534


def test_the_child_gets_nothing_of_the_parents_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_GATEWAY_ADMIN_KEY", "secret-admin-key")
    seen = {}
    real_popen = subprocess.Popen

    def recording_popen(args, **kwargs):
        seen.update(args=args, env=kwargs["env"], close_fds=kwargs["close_fds"])
        return real_popen(args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    tensors = {"a": torch.randn(3, 2), "b": torch.randn(2).to(torch.bfloat16)}
    loaded = load_pickled_tensors(saved(tensors, tmp_path / "w.bin", legacy=True), "adapter_model.bin")
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)  # torch's legacy format too
    assert seen["args"][1] == "-I" and seen["close_fds"] is True
    assert seen["args"][4] == ROOT  # the child runs the parent's copy of the code
    assert "secret-admin-key" not in json.dumps(seen["env"])
    assert str(tmp_path) not in " ".join(seen["args"])  # the child is handed the file, not its path


def test_the_reader_refuses_a_global_by_name_before_anything_runs(tmp_path):
    # What the sandbox relies on first: the child's unpickler never resolves, let alone calls, code.
    marker = tmp_path / "ran"
    data = io.BytesIO()
    torch.save({"x": LeavesATrace(marker)}, data)
    with pytest.raises(torch_file.CodeInPickle) as refused:
        torch_file.load(data.getvalue())
    assert refused.value.name == "posix.system"
    assert not marker.exists()


class ReachesPastItsStorage:
    """Pickles as a tensor of 100 elements over a storage of 2: a read out of bounds, if trusted."""

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (torch.zeros(2).storage(), 0, (100,), (1,), False, OrderedDict()))


class GrowsAfterItIsBuilt:
    """Pickles as a valid 2-element tensor, then sets its size to 100 (pickle's BUILD)."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        args = (torch.zeros(2).storage(), 0, (2,), (1,), False, OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args, self.state)


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
@pytest.mark.parametrize(
    "tensor",
    [ReachesPastItsStorage(), GrowsAfterItIsBuilt({"size": (100,)}), GrowsAfterItIsBuilt((None, {"size": (100,)}))],
    ids=["past-its-storage", "build-dict", "build-slots"],
)
def test_a_tensor_that_reaches_past_its_storage_is_refused(tensor):
    data = io.BytesIO()
    torch.save({"a": tensor}, data)
    with pytest.raises(sandbox._Refused) as refused:
        sandbox._load_flat_tensors(data.getvalue(), max_tensors=10, max_bytes=1 << 20)
    assert refused.value.report["reason"] == "unreadable"


def test_a_big_endian_archive_reads_as_the_same_tensors():
    tensors = {"a": torch.randn(3, 2), "b": torch.randn(4).to(torch.bfloat16), "c": torch.randn(2, 3).t()}
    little = io.BytesIO()
    torch.save(tensors, little)
    big = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(little.getvalue())) as source, zipfile.ZipFile(big, "w") as target:
        for entry in source.namelist():
            content = source.read(entry)
            if entry.endswith("/byteorder"):
                content = b"big"
            elif "/data/" in entry:  # each storage's elements, byte-swapped: 4 bytes for "a" and "c", 2 for "b"
                width = 2 if len(content) == 8 else 4
                content = b"".join(content[i : i + width][::-1] for i in range(0, len(content), width))
            target.writestr(entry, content)
    loaded = safetensors_load(
        b"".join(
            torch_file.safetensors_bytes(sandbox._load_flat_tensors(big.getvalue(), max_tensors=10, max_bytes=1 << 20))
        )
    )
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_the_reader_imports_no_torch(tmp_path):
    path = saved({"a": torch.randn(2)}, tmp_path / "w.bin")
    check = (
        "import sys; sys.path.insert(0, sys.argv[1]); from adapters import torch_file; "
        "torch_file.load(open(sys.argv[2], 'rb').read()); print(sorted(m for m in sys.modules if m.startswith('torch')))"
    )
    run = subprocess.run([sys.executable, "-I", "-c", check, ROOT, str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "['torch_file']" or run.stdout.strip() == "[]"
