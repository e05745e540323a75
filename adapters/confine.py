"""What a process may do to itself, without privileges, to hold code it does not trust.

- `leave_network`: a new, empty network namespace; as root directly, otherwise inside a new user
  namespace (unprivileged user namespaces, where the kernel and the container allow them).
- `drop_capabilities`: the capabilities a new user namespace grants, given up once used.
- `die_with_parent`: the kernel kills this process when its parent dies (PR_SET_PDEATHSIG), so
  that a gateway killed outright leaves nothing running.
- `allow_only`: a seccomp filter (libseccomp, through pyseccomp): every system call outside a short
  list fails with EPERM, for this process and all its threads, and no later filter can lift it.

Each returns what it applied, or raises; callers decide what is required.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys
from collections.abc import Callable, Iterable

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_AT_EMPTY_PATH = 0x1000

# What a process that only reads its standard input and writes its standard output and error
# needs once it is running: memory, signals to itself, time and exit. Nothing opens a path or a
# socket, starts a process or thread, executes a program, signals or traces another process.
READ_WRITE_ONLY = (
    "read",
    "readv",
    "pread64",
    "write",
    "writev",
    "lseek",
    "close",
    "fstat",
    "fcntl",
    "mmap",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    "brk",
    "futex",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sigaltstack",
    "getpid",
    "gettid",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "getrandom",
    "clock_gettime",
    "clock_getres",
    "clock_nanosleep",
    "nanosleep",
    "gettimeofday",
    "sched_yield",
    "sched_getaffinity",
    "exit",
    "exit_group",
)


class ConfinementUnavailable(RuntimeError):
    """The kernel, the container or the host lacks what a confinement step needs."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise ConfinementUnavailable(f"{what}: {os.strerror(code) if code else 'failed'}")


def leave_network() -> str:
    """Move this (single-threaded) process into a new network namespace with no interface up.

    Not root: inside a new user namespace that maps only this process's own user and group, which
    gives it capabilities there (see drop_capabilities) and nowhere else.
    """
    libc = _libc()
    if os.geteuid() == 0:
        _check(libc.unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        return "no network"
    uid, gid = os.geteuid(), os.getegid()
    _check(libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET), "unshare(CLONE_NEWUSER|CLONE_NEWNET)")
    # Map this user to itself, so that ids read the same inside; setgroups must be denied first.
    for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as control:
            control.write(text)
    return "no network (user namespace)"


def drop_capabilities() -> None:
    """Give up every capability (effective, permitted, inheritable) this thread holds."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header, data = Header(_LINUX_CAPABILITY_VERSION_3, 0), (Data * 2)()
    _check(_libc().capset(ctypes.byref(header), data), "capset")


def no_new_privileges() -> None:
    _check(_libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def not_dumpable() -> None:
    """Other processes of this user can no longer read this one's memory, environment or descriptors
    under /proc, nor trace it; reset by execve, so each program sets it for itself."""
    _check(_libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Be sent `sig` when the parent dies; exit at once when `parent` is already gone.

    The kernel sends it when the *thread* that started this process exits, so the parent must
    start it from a thread that lives as long as the parent does (its main thread). A change of
    user or group clears it: call this after any.
    """
    if sys.platform != "linux":
        return
    _check(_libc().prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # the parent died before the line above: nobody will signal
        os.kill(os.getpid(), sig)
        os._exit(1)


def parent_death_hook(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn` for subprocess: the child dies with this process (see die_with_parent).

    Everything it needs is looked up here, before the fork: after it, in a process that had
    threads, only the simplest calls are safe.
    """
    parent = os.getpid()
    prctl = _libc().prctl if sys.platform == "linux" else None

    def arm() -> None:
        if prctl is None:
            return
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return arm


def allow_only(syscalls: Iterable[str]) -> None:
    """Install a seccomp filter under which only `syscalls` succeed; any other fails with EPERM.

    fstat-by-path variants are allowed only on a descriptor (AT_EMPTY_PATH), and a signal only to
    this process. Applies to every thread (TSYNC) and needs no privilege (no-new-privileges is set).
    """
    try:
        import pyseccomp as seccomp
    except (ImportError, RuntimeError) as exc:  # RuntimeError: pyseccomp found no libseccomp
        raise ConfinementUnavailable(f"seccomp: {exc}") from None
    pid = os.getpid()
    try:
        rules = seccomp.SyscallFilter(seccomp.ERRNO(errno.EPERM))
        rules.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)  # no 32-bit or x32 detour
        rules.set_attr(seccomp.Attr.CTL_TSYNC, 1)
        for name in syscalls:
            rules.add_rule(seccomp.ALLOW, name)
        empty_path = seccomp.Arg(3, seccomp.MASKED_EQ, _AT_EMPTY_PATH, _AT_EMPTY_PATH)
        rules.add_rule(seccomp.ALLOW, "newfstatat", empty_path)  # what glibc's fstat calls
        rules.add_rule(seccomp.ALLOW, "tgkill", seccomp.Arg(0, seccomp.EQ, pid))  # abort(), raise()
        rules.load()
    except OSError as exc:
        raise ConfinementUnavailable(f"seccomp: {exc.strerror or exc}") from None
