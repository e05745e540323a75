"""The content-addressed adapter store: one read-only folder per content hash.

Files are first copied into a private staging folder (regular files only, never following a
link), validated there, and only then renamed into place. The engine always loads the store's
copy, which nothing changes afterwards, so a source folder edited later cannot affect it.

With a shared backend (`Blobs`: a shared folder or an S3 bucket), the local folder is this
process's cache: each committed adapter is also uploaded as one uncompressed tar, and an
adapter another process registered is fetched, checked against its content hash and cached.

Committing content that is stored already makes its folder and object new again (their modified
time), so the store sweep (adapters/retention.py) leaves them alone until the registration's row
names them.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import stat
import tarfile
import uuid
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from adapters.archive import members, tar_stream
from adapters.blobs import BlobNotFound, Blobs
from adapters.errors import AdapterTooLarge, InvalidAdapter, StoreUnavailable
from adapters.limits import MAX_ARCHIVE_MEMBERS
from adapters.validate import ALLOWED_FILES, DEFAULT_MAX_BYTES, STAGING_FILES
from adapters.validate import content_hash as folder_hash  # the parameters here are named content_hash

logger = logging.getLogger(__name__)

ADAPTER_PREFIX = "adapters/"
_CHUNK = 1 << 20
_CONTENT_HASH = re.compile(r"[0-9a-f]{64}")
_TAMPERED = "the stored adapter's files do not match their content hash"


class AdapterStore:
    """Adapter folders under `root`, named by content hash; a cache of `blobs` when it has one."""

    def __init__(
        self,
        root: Path,
        blobs: Blobs | None = None,
        on_error: Callable[[], None] | None = None,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ):
        self.root = Path(root)
        self.blobs = blobs
        self.max_bytes = max_bytes  # bounds what a fetched archive may unpack to
        self.on_error = on_error  # public: the server may attach its metric after building the store
        self._staging = self.root / ".staging"
        self._staging.mkdir(parents=True, exist_ok=True)

    def path_for(self, content_hash: str) -> Path:
        return self.root / content_hash

    def has_local(self, content_hash: str) -> bool:
        return self.path_for(content_hash).is_dir()

    def new_staging(self) -> Path:
        folder = self._staging / uuid.uuid4().hex
        folder.mkdir(mode=0o700)
        return folder

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def commit(self, staging: Path, content_hash: str) -> Path:
        """Move a validated staging folder into place and upload it; the same content is stored once.

        The upload runs even when the folder was here already: an earlier upload may have failed.
        """
        _check_hash(content_hash)
        final = self._place(staging, content_hash)
        if self.blobs is not None:
            self._upload(final, content_hash)
        return final

    def ensure_local(self, content_hash: str) -> Path:
        """The adapter's local folder, fetched from the shared store first when not cached here."""
        _check_hash(content_hash)
        final = self.path_for(content_hash)
        if final.is_dir():
            return final
        if self.blobs is None:
            raise InvalidAdapter("the adapter's files are missing from the store; register it again")
        staging = self.new_staging()
        try:
            self._fetch(content_hash, staging)
            return self._place(staging, content_hash)
        except BaseException:
            self.discard(staging)
            raise

    def remove_unreferenced(self, referenced: set[str]) -> int:
        """Delete local folders no catalog entry names; returns how many. Shared objects stay."""
        removed = 0
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or entry.name in referenced:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging.mkdir(parents=True, exist_ok=True)
        return removed

    def local_objects(self) -> list[tuple[str, float]]:
        """The content hashes cached here, with each folder's modified time."""
        listed = []
        for entry in self.root.iterdir():
            if _CONTENT_HASH.match(entry.name):
                try:
                    listed.append((entry.name, entry.stat().st_mtime))
                except FileNotFoundError:
                    pass  # removed meanwhile
        return listed

    def remove_local(self, content_hash: str, older_than: float) -> bool:
        """Delete the local folder unless it was made or committed again since `older_than`; True if deleted."""
        _check_hash(content_hash)
        final = self.path_for(content_hash)
        try:
            if final.stat().st_mtime >= older_than:
                return False
        except FileNotFoundError:
            return False
        shutil.rmtree(final, ignore_errors=True)
        return True

    def _place(self, staging: Path, content_hash: str) -> Path:
        final = self.path_for(content_hash)
        if final.is_dir():
            os.utime(final)  # committed again: new to the sweep
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

    def _upload(self, folder: Path, content_hash: str) -> None:
        assert self.blobs is not None
        key = _blob_key(content_hash)
        archive = self._staging / f"{uuid.uuid4().hex}.tar"
        try:
            if self.blobs.touch(key):  # stored already: new to the sweep, as an upload would be
                return
            _write_tar(folder, archive)
            self.blobs.put(key, archive)
            logger.info("uploaded adapter %s to %s", content_hash[:12], self.blobs.describe())
        except StoreUnavailable:
            self._failed()
            raise
        finally:
            archive.unlink(missing_ok=True)

    def _fetch(self, content_hash: str, staging: Path) -> None:
        """Download and unpack the adapter's archive into staging, and check its content hash."""
        assert self.blobs is not None
        archive = staging.with_suffix(".tar")  # beside staging: the hash covers every file inside
        try:
            try:
                self.blobs.get(_blob_key(content_hash), archive)
            except BlobNotFound:
                raise StoreUnavailable("the adapter's files are not in the store") from None
            try:
                with open(archive, "rb") as raw:
                    _unpack(tar_stream(raw, self.max_bytes, compressed=False), staging, self.max_bytes)
                intact = folder_hash(staging) == content_hash
            except (OSError, InvalidAdapter) as exc:
                logger.warning("stored adapter %s is unreadable: %s", content_hash[:12], exc)
                intact = False
            if not intact:
                raise InvalidAdapter(_TAMPERED)
        except (StoreUnavailable, InvalidAdapter):
            self._failed()
            raise
        finally:
            archive.unlink(missing_ok=True)
        logger.info("fetched adapter %s from %s", content_hash[:12], self.blobs.describe())

    def _failed(self) -> None:
        if self.on_error is not None:
            self.on_error()


def open_adapter_store(url: str | None, cache_dir: Path, max_bytes: int) -> AdapterStore:
    """A local folder (a path), or a local cache in `cache_dir` in front of a shared folder or bucket (a URL)."""
    from adapters.blobs import open_blobs

    if url and "://" not in url:
        return AdapterStore(Path(url), max_bytes=max_bytes)
    return AdapterStore(cache_dir, blobs=open_blobs(url), max_bytes=max_bytes)


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
    with os.scandir(source) as scan:
        entries = []
        for entry in scan:  # counted while listed: a folder of a million entries stops at the cap
            entries.append(entry)
            if len(entries) > MAX_ARCHIVE_MEMBERS:
                raise InvalidAdapter(
                    f"the adapter folder holds more than {MAX_ARCHIVE_MEMBERS} entries; an adapter is a few files"
                )
    total = 0
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.is_symlink():
            raise InvalidAdapter(f"'{entry.name}' is a symbolic link; adapters must be plain files")
        if not entry.is_file(follow_symlinks=False):
            raise InvalidAdapter(f"'{entry.name}' is not a plain file; adapters are flat folders of files")
        _check_member_name(entry.name, STAGING_FILES)
        if total + entry.stat(follow_symlinks=False).st_size > max_bytes:
            raise AdapterTooLarge(f"the adapter is over the {max_bytes}-byte limit")
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(os.path.join(source, entry.name), flags)
        with os.fdopen(fd, "rb") as reader, open(staging / entry.name, "wb") as writer:
            total += _copy_limited(reader, writer, max_bytes - total)  # a file may grow after its stat


def write_files(files: Iterable[tuple[str, io.BufferedIOBase]], staging: Path, max_bytes: int) -> None:
    """Write uploaded files (name, stream) into staging, within the size limit."""
    total = 0
    for name, stream in files:
        name = _check_member_name(os.path.basename(name or ""), STAGING_FILES)
        with open(staging / name, "wb") as writer:
            total += _copy_limited(stream, writer, max_bytes - total)


def write_stream(stream: BinaryIO, dest: Path, max_bytes: int) -> None:
    """Write one uploaded stream to `dest`, stopping at `max_bytes`."""
    with open(dest, "wb") as writer:
        _copy_limited(stream, writer, max_bytes)


def extract_tarball(stream: BinaryIO, staging: Path, max_bytes: int) -> None:
    """Unpack a .tar.gz (or .tar) of adapter files: regular files only, flat or under one folder.

    The archive is read within bounds as it is unpacked (adapters/archive.py): a bomb stops at
    its first header or at `max_bytes`, never after.
    """
    try:
        _unpack(tar_stream(stream, max_bytes), staging, max_bytes, STAGING_FILES)
    except (EOFError, OSError, zlib.error):  # gzip's errors: BadGzipFile is an OSError
        raise InvalidAdapter("the upload is not a readable .tar.gz archive") from None


def _unpack(tar: BinaryIO, staging: Path, max_bytes: int, allowed: set[str] = ALLOWED_FILES) -> None:
    total = 0
    for member, data in members(tar):
        if member.kind == "dir":
            continue
        if member.kind != "file":
            raise InvalidAdapter(f"'{member.name[:80]}' in the archive is a link or device; only plain files")
        parts = [p for p in member.name.split("/") if p not in ("", ".")]
        if not parts or ".." in parts or len(parts) > 2 or member.name.startswith("/"):
            raise InvalidAdapter(f"'{member.name[:80]}' in the archive points outside the adapter folder")
        name = _check_member_name(parts[-1], allowed)
        if (staging / name).exists():
            raise InvalidAdapter(f"the archive holds '{name}' twice")
        total += member.size
        if total > max_bytes:
            raise AdapterTooLarge(f"the adapter is over the {max_bytes}-byte limit")
        with open(staging / name, "wb") as writer:
            _copy_limited(data, writer, member.size)


def _write_tar(folder: Path, dest: Path) -> None:
    """An uncompressed tar of a flat folder, the same bytes for the same files wherever it is made."""
    with tarfile.open(dest, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for path in sorted(folder.iterdir()):
            info = tarfile.TarInfo(path.name)
            info.size = path.stat().st_size
            info.mode = 0o444  # mtime, owner and group keep TarInfo's fixed defaults
            with path.open("rb") as reader:
                archive.addfile(info, reader)


def _blob_key(content_hash: str) -> str:
    return f"{ADAPTER_PREFIX}{content_hash}.tar"


def adapter_blob_key(content_hash: str) -> str:
    """The shared object that holds an adapter's files."""
    _check_hash(content_hash)
    return _blob_key(content_hash)


def content_hash_of(key: str) -> str | None:
    """The content hash an adapter object's key names; None for other keys."""
    digest = key.removeprefix(ADAPTER_PREFIX).removesuffix(".tar")
    return digest if key == _blob_key(digest) and _CONTENT_HASH.match(digest) else None


def _check_hash(content_hash: str) -> None:
    # The hash names a folder and an object key; a catalog row must not steer either elsewhere.
    if not _CONTENT_HASH.fullmatch(content_hash):
        raise InvalidAdapter("an adapter's content hash is 64 lowercase hex digits (sha256)")


def _check_member_name(name: str, allowed: set[str] = ALLOWED_FILES) -> str:
    """Staging takes PEFT's adapter_model.bin too (converted before it is validated); the store never does."""
    if name not in allowed:
        if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")):
            hint = (
                "send adapter_model.safetensors, PEFT's adapter_model.bin, or a MiniMind .pth with format=minimind"
                if allowed is STAGING_FILES
                else "send adapter_model.safetensors"
            )
            raise InvalidAdapter(f"'{name[:80]}' is a pickled checkpoint, which runs code when loaded; {hint}")
        raise InvalidAdapter(f"unexpected file '{name[:80]}'; an adapter holds only {', '.join(sorted(allowed))}")
    return name


def _copy_limited(reader, writer, limit: int) -> int:
    written = 0
    while chunk := reader.read(_CHUNK):
        written += len(chunk)
        if written > limit:
            raise AdapterTooLarge("the adapter is over the size limit")
        writer.write(chunk)
    return written
