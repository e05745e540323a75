"""The content-addressed adapter store: one read-only folder per content hash.

Files are first copied into a private staging folder (regular files only, never following a
link), validated there, and only then renamed into place. The engine always loads the store's
copy, which nothing changes afterwards, so a source folder edited later cannot affect it.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import uuid
from collections.abc import Iterable
from pathlib import Path

from adapters.errors import AdapterTooLarge, InvalidAdapter
from adapters.validate import ALLOWED_FILES

_CHUNK = 1 << 20


class AdapterStore:
    """Adapter folders under `root`, named by content hash."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._staging = self.root / ".staging"
        self._staging.mkdir(parents=True, exist_ok=True)

    def path_for(self, content_hash: str) -> Path:
        return self.root / content_hash

    def new_staging(self) -> Path:
        folder = self._staging / uuid.uuid4().hex
        folder.mkdir(mode=0o700)
        return folder

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def commit(self, staging: Path, content_hash: str) -> Path:
        """Move a validated staging folder into place; the same content is stored once."""
        final = self.path_for(content_hash)
        if final.is_dir():
            self.discard(staging)
            return final
        for entry in staging.iterdir():
            entry.chmod(0o444)
        try:
            os.rename(staging, final)
        except OSError:
            if not final.is_dir():
                raise
            self.discard(staging)  # stored by a concurrent registration of the same content
        return final

    def remove_unreferenced(self, referenced: set[str]) -> int:
        """Delete stored folders no catalog entry names; returns how many."""
        removed = 0
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or entry.name in referenced:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging.mkdir(parents=True, exist_ok=True)
        return removed


def copy_folder(source: Path, staging: Path, max_bytes: int) -> None:
    """Copy an adapter folder's files into staging without following links."""
    try:
        source_stat = os.lstat(source)
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        raise InvalidAdapter("no adapter folder at that path") from None
    if stat.S_ISLNK(source_stat.st_mode):
        raise InvalidAdapter("the adapter path is a symbolic link; give the folder itself")
    if not stat.S_ISDIR(source_stat.st_mode):
        raise InvalidAdapter("no adapter folder at that path")
    total = 0
    for entry in sorted(os.scandir(source), key=lambda e: e.name):
        if entry.is_symlink():
            raise InvalidAdapter(f"'{entry.name}' is a symbolic link; adapters must be plain files")
        if not entry.is_file(follow_symlinks=False):
            raise InvalidAdapter(f"'{entry.name}' is not a plain file; adapters are flat folders of files")
        _check_member_name(entry.name)
        total += entry.stat(follow_symlinks=False).st_size
        if total > max_bytes:
            raise AdapterTooLarge(f"the adapter is over the {max_bytes}-byte limit")
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(os.path.join(source, entry.name), flags)
        with os.fdopen(fd, "rb") as reader, open(staging / entry.name, "wb") as writer:
            _copy_limited(reader, writer, max_bytes)


def write_files(files: Iterable[tuple[str, io.BufferedIOBase]], staging: Path, max_bytes: int) -> None:
    """Write uploaded files (name, stream) into staging, within the size limit."""
    total = 0
    for name, stream in files:
        name = _check_member_name(os.path.basename(name or ""))
        with open(staging / name, "wb") as writer:
            total += _copy_limited(stream, writer, max_bytes - total)


def extract_tarball(stream: io.BufferedIOBase, staging: Path, max_bytes: int) -> None:
    """Unpack a .tar.gz of adapter files: regular files only, flat or under one folder."""
    total = 0
    try:
        with tarfile.open(fileobj=stream, mode="r:*") as archive:
            for member in archive:
                if member.isdir():
                    continue
                if not member.isfile():
                    raise InvalidAdapter(f"'{member.name}' in the archive is a link or device; only plain files")
                parts = [p for p in member.name.split("/") if p not in ("", ".")]
                if ".." in parts or len(parts) > 2 or member.name.startswith("/"):
                    raise InvalidAdapter(f"'{member.name}' in the archive points outside the adapter folder")
                name = _check_member_name(parts[-1])
                if (staging / name).exists():
                    raise InvalidAdapter(f"the archive holds '{name}' twice")
                total += member.size
                if total > max_bytes:
                    raise AdapterTooLarge(f"the adapter is over the {max_bytes}-byte limit")
                reader = archive.extractfile(member)
                assert reader is not None
                with open(staging / name, "wb") as writer:
                    _copy_limited(reader, writer, member.size)
    except (tarfile.TarError, EOFError, OSError):
        raise InvalidAdapter("the upload is not a readable .tar.gz archive") from None


def _check_member_name(name: str) -> str:
    if name not in ALLOWED_FILES:
        allowed = ", ".join(sorted(ALLOWED_FILES))
        if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")):
            raise InvalidAdapter(
                f"'{name[:80]}' is a pickled checkpoint, which runs code when loaded; send adapter_model.safetensors"
            )
        raise InvalidAdapter(f"unexpected file '{name[:80]}'; an adapter holds only {allowed}")
    return name


def _copy_limited(reader, writer, limit: int) -> int:
    written = 0
    while chunk := reader.read(_CHUNK):
        written += len(chunk)
        if written > limit:
            raise AdapterTooLarge("the adapter is over the size limit")
        writer.write(chunk)
    return written
