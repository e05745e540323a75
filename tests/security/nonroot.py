"""Running a command as a user who is not root, as the images run the gateway (uid 10001).

As root, the command runs as `nobody` through setpriv. When the interpreter lies under a folder
others cannot enter (pyenv under /root, say), it runs in a private mount namespace in which that
folder is replaced by an empty tmpfs holding only the needed entries, bound from the real one:
nothing changes outside. Not root, the command runs as it is.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
import tempfile
from pathlib import Path

NOBODY = 65534


def is_root() -> bool:
    return os.geteuid() == 0


def as_nobody(command: list[str], scratch: Path, needed: list[Path] = ()) -> list[str]:
    """`command`, run as nobody when this is root; `needed` are paths it must reach besides Python's,
    `scratch` a folder for the mount points the namespace needs."""
    if not is_root():
        return command
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    paths = [Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve(), *map(Path, needed)]
    closed: dict[Path, set[str]] = {}
    for path in paths:
        ancestors = list(path.resolve().parents)[::-1]  # from / down
        for ancestor, below in zip(ancestors, [*ancestors[1:], path.resolve()], strict=True):
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                closed.setdefault(ancestor, set()).add(below.name)
                break
    if not closed:
        return drop + command
    lines = ["set -e"]
    for folder, entries in closed.items():
        real = tempfile.mkdtemp(prefix="real-", dir=scratch)  # a mount point, used inside the namespace only
        lines.append(f"mount --bind {shlex.quote(str(folder))} {shlex.quote(real)}")
        lines.append(f"mount -t tmpfs -o mode=0755,size=1m tmpfs {shlex.quote(str(folder))}")
        for entry in sorted(entries):
            inside, outside = shlex.quote(str(folder / entry)), shlex.quote(f"{real}/{entry}")
            lines.append(f"if [ -d {outside} ]; then mkdir {inside}; else touch {inside}; fi")
            lines.append(f"mount --bind {outside} {inside}")
    lines.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", "\n".join(lines), "sh", *drop, *command]


def open_folder(prefix: str) -> Path:
    """A new folder that nobody may use: in the system's temporary folder, not pytest's (0700)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o777)
    return folder
