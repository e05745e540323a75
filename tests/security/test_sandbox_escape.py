"""A pickle whose code gets past the child's unpickler still reaches nothing.

The sandbox (adapters/sandbox.py) has two walls: the unpickler's short list of globals
(adapters/torch_file.py), then the locked-down child.
These tests open a hole in the first, in the child only, and run code there as a hostile tenant
would: it tries to read files, open a socket, start a process, signal its parent and read the
gateway's environment from /proc. The parent runs as a user who is not root, as the images do,
and, where this runs as root, as root too. Legitimate `.bin` and `.pth` files still convert.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.security.nonroot import as_nobody, is_root, open_folder

ROOT = Path(__file__).resolve().parents[2]
CANARY = "canary-admin-key-4b1d"

# The child's code with one change: a pickle the unpickler refuses is then loaded with plain
# pickle, as a gap in its list would let it through. Everything else is the real child's.
HOLE = """
import json, pickle, socket, sys
sys.path.insert(0, sys.argv[1])
from adapters import sandbox
real_loader = sandbox._load_flat_tensors
def loader_with_a_hole(data, max_tensors, max_bytes):
    try:
        return real_loader(data, max_tensors, max_bytes)
    except sandbox._Refused:
        return pickle.loads(data)
sandbox._load_flat_tensors = loader_with_a_hole
sys.exit(sandbox._child_main(json.loads(sys.argv[-1])))
"""

# The tenant's code. It reports on the child's stderr, the one channel it keeps.
ESCAPE = """
import json, os
results = {}
def attempt(name, action):
    try:
        results[name] = "allowed: " + str(action())
    except BaseException as exc:
        results[name] = "refused: " + type(exc).__name__
try:
    os.close(0)  # frees a descriptor under RLIMIT_NOFILE for what follows
except OSError:
    pass
def read(path):
    with open(path, "rb") as file:
        return len(file.read())
def parents_environment():
    with open("/proc/%d/environ" % os.getppid(), "rb") as file:
        return file.read().decode(errors="replace")
def create():
    with open(WORKDIR + "/dropped-by-the-tenant", "w") as file:
        file.write("x")
def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return os.waitpid(pid, 0)
def open_socket():
    import socket
    socket.socket().close()
attempt("read /etc/passwd", lambda: read("/etc/passwd"))
attempt("read another tenant's file", lambda: read(WORKDIR + "/other-tenant.safetensors"))
attempt("read the parent's environment", parents_environment)
attempt("create a file", create)
attempt("open a socket", open_socket)
attempt("fork", fork)
attempt("signal the parent", lambda: os.kill(os.getppid(), 0))
os.write(2, (json.dumps({"escape": results}) + "\\n").encode())
"""

# The gateway's side: converts the legitimate files, then the hostile one through the hole.
DRIVER = """
import json, subprocess, sys
from pathlib import Path
root, workdir, deny_namespaces, hole = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
sys.path.insert(0, root)
if deny_namespaces:  # as Docker's default seccomp profile does for a process without CAP_SYS_ADMIN
    import errno, pyseccomp
    rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    rules.add_rule(pyseccomp.ERRNO(errno.EPERM), "unshare")
    rules.load()
from adapters import sandbox
from adapters.errors import InvalidAdapter
result = {}
for name in ("adapter_model.bin", "consolidated.pth"):
    result[name] = sorted(sandbox.load_pickled_tensors(workdir / name, name))
real_popen = subprocess.Popen
def popen_with_a_hole(args, **kwargs):
    if list(args[:2]) != [sys.executable, "-I"]:  # another program (ctypes runs ldconfig)
        return real_popen(args, **kwargs)
    kwargs["stderr"] = open(workdir / "child-stderr", "wb")
    return real_popen([args[0], "-I", "-c", hole, root, args[-1]], **kwargs)
subprocess.Popen = popen_with_a_hole
try:
    sandbox.load_pickled_tensors(workdir / "evil.bin", "adapter_model.bin")
    result["evil"] = "loaded"
except InvalidAdapter as exc:
    result["evil"] = exc.message
print(json.dumps(result))
"""


class Escape:
    """A pickle that runs `code` when loaded."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code, {}))  # one namespace, so that its functions see each other


def prepare(workdir: Path) -> dict[str, list[str]]:
    legit = {"adapter_model.bin": {"lora_A": torch.randn(4, 8), "lora_B": torch.randn(8, 4).to(torch.bfloat16)}}
    legit["consolidated.pth"] = {"layers.0.wq.lora_a": torch.randn(2, 8)}  # a MiniMind-style .pth
    torch.save(legit["adapter_model.bin"], workdir / "adapter_model.bin")
    torch.save(legit["consolidated.pth"], workdir / "consolidated.pth", _use_new_zipfile_serialization=False)
    (workdir / "evil.bin").write_bytes(pickle.dumps(Escape(ESCAPE.replace("WORKDIR", repr(str(workdir)))), 2))
    (workdir / "other-tenant.safetensors").write_bytes(b"another tenant's weights")
    for path in workdir.iterdir():
        path.chmod(0o644)
    return {name: sorted(tensors) for name, tensors in legit.items()}


def run_driver(workdir: Path, *, as_root: bool, deny_namespaces: bool) -> dict:
    command = [sys.executable, "-I", "-c", DRIVER, str(ROOT), str(workdir), str(int(deny_namespaces)), HOLE]
    if not as_root:
        command = as_nobody(command, workdir, [ROOT])
    env = {"PATH": os.environ.get("PATH", os.defpath), "LORA_GATEWAY_ADMIN_KEY": CANARY, "HOME": str(workdir)}
    driver = subprocess.run(command, capture_output=True, text=True, cwd=workdir, env=env, timeout=300)
    assert driver.returncode == 0, driver.stderr[-3000:]
    return json.loads(driver.stdout.strip().splitlines()[-1])


def escape_report(workdir: Path) -> dict[str, str]:
    for line in (workdir / "child-stderr").read_text(errors="replace").splitlines():
        if line.startswith('{"escape"'):
            return json.loads(line)["escape"]
    raise AssertionError("the tenant's code did not run: " + (workdir / "child-stderr").read_text()[-2000:])


@pytest.mark.parametrize(
    ("as_root", "deny_namespaces"),
    [(False, False), (False, True), (True, False)],
    ids=["not-root", "not-root-without-user-namespaces", "root"],
)
def test_code_that_gets_past_the_unpickler_reaches_nothing(as_root, deny_namespaces):
    if as_root and not is_root():
        pytest.skip("runs as root only where the tests run as root (CI does)")
    workdir = open_folder("lgw-escape-")
    try:
        expected = prepare(workdir)
        result = run_driver(workdir, as_root=as_root, deny_namespaces=deny_namespaces)
        assert result["adapter_model.bin"] == expected["adapter_model.bin"]
        assert result["consolidated.pth"] == expected["consolidated.pth"]
        assert result["evil"] != "loaded"
        escape = escape_report(workdir)
        assert CANARY not in json.dumps(escape)
        allowed = {name: outcome for name, outcome in escape.items() if not outcome.startswith("refused")}
        assert allowed == {}, f"the tenant's code could: {allowed}"
        assert not (workdir / "dropped-by-the-tenant").exists()
    finally:
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
