"""Tar archives read within fixed bounds: the bytes decompressed, the number of headers and the
size of each extended header are capped while the archive is read, not after.

CPython's tarfile cannot do this. It reads a PAX or GNU long-name header whole as soon as it
meets one, whatever size the header declares, and 3.11 parses PAX records in quadratic time and
memory; it keeps every member it has read. So the archive is walked here, one 512-byte block at
a time: each header is decoded by `TarInfo.frombuf` (documented, and given one block only), and
an extended header's records are read only once its declared size is known to be small.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from adapters.errors import AdapterTooLarge, InvalidAdapter
from adapters.limits import ARCHIVE_OVERHEAD_BYTES, MAX_ARCHIVE_MEMBERS, MAX_EXTENDED_HEADER_BYTES

_BLOCK = tarfile.BLOCKSIZE
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)
_LONG_NAME_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_UNREADABLE = "the upload is not a readable .tar.gz archive"


@dataclass(frozen=True)
class Member:
    """One entry of an archive, its extended headers applied."""

    name: str
    size: int
    kind: str  # "file", "dir" or "other" (links, devices, FIFOs)


class LimitedReader(io.RawIOBase):
    """Reads `source`, and refuses once more than `limit` bytes have come out of it.

    Around a decompressing reader it stops a bomb at the limit: each read asks the source for no
    more than one byte past what is left, so no more than that is ever decompressed.
    """

    def __init__(self, source: BinaryIO, limit: int):
        super().__init__()
        self.source = source
        self.limit = limit
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        left = self.limit - self.count + 1
        chunk = self.source.read(left if size is None or size < 0 else min(size, left))
        self.count += len(chunk)
        if self.count > self.limit:
            raise AdapterTooLarge(f"the archive unpacks to more than {self.limit} bytes; the limit is {self.limit}")
        return chunk

    def readinto(self, buffer) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def tar_stream(stream: BinaryIO, max_bytes: int, *, compressed: bool = True) -> LimitedReader:
    """The tar bytes of `stream`, capped at `max_bytes` plus room for the tar's own headers.

    With `compressed`, `stream` may be a plain or a gzip-compressed tar, told apart by its first
    bytes (so it must be seekable). bzip2 and xz are refused: each decompressor is one more
    memory behaviour facing tenants, and gzip is what adapters are shipped in.
    """
    source = stream
    if compressed:
        magic = stream.read(6)
        stream.seek(0)
        if magic.startswith(b"\x1f\x8b"):
            source = gzip.GzipFile(fileobj=stream, mode="rb")
        elif magic.startswith((b"BZh", b"\xfd7zXZ\x00")):
            raise InvalidAdapter("bzip2 and xz archives are not accepted; send a .tar.gz (gzip) or a plain .tar")
    return LimitedReader(source, max_bytes + ARCHIVE_OVERHEAD_BYTES)


def members(tar: BinaryIO) -> Iterator[tuple[Member, BinaryIO]]:
    """Each member with a reader of its data, which is valid until the next member is asked for.

    A member's data the caller leaves unread is skipped. Raises InvalidAdapter for more than
    MAX_ARCHIVE_MEMBERS headers, an extended header over MAX_EXTENDED_HEADER_BYTES, sparse files,
    and anything that is not a tar.
    """
    headers = 0
    pending: dict[str, str] = {}  # path and size from extended headers, for the next member
    while True:
        block = _read_exactly(tar, _BLOCK, allow_eof=True)
        if not block.strip(b"\0"):
            return  # the end-of-archive block (tarfile too stops at the first), or the end of the data
        headers += 1
        if headers > MAX_ARCHIVE_MEMBERS:
            raise InvalidAdapter(
                f"the archive has more than {MAX_ARCHIVE_MEMBERS} entries (folders and extended headers "
                "count too); an adapter is a few files: adapter_config.json, adapter_model.safetensors, README.md"
            )
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "replace")
        except tarfile.HeaderError:
            raise InvalidAdapter(_UNREADABLE) from None
        if info.type in _PAX_TYPES or info.type == tarfile.XGLTYPE:
            records = _pax_records(_read_extended(tar, info))
            if any(key.startswith("GNU.sparse.") for key in records):
                raise InvalidAdapter("the archive holds a sparse file; archive plain files")
            if info.type == tarfile.XGLTYPE:
                if {"path", "size"} & set(records):  # `git archive` writes one with a comment only
                    raise InvalidAdapter("the archive's global header sets a path or size; archive plain files")
            else:
                pending.update({key: records[key] for key in ("path", "size") if key in records})
            continue
        if info.type in _LONG_NAME_TYPES:
            data = _read_extended(tar, info)
            if info.type == tarfile.GNUTYPE_LONGNAME:
                pending["path"] = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if info.type == tarfile.GNUTYPE_SPARSE:
            raise InvalidAdapter("the archive holds a sparse file; archive plain files")
        member = _member(info, pending)
        pending = {}
        # As in tarfile: links, devices and folders carry no data; a type it does not know does.
        has_data = member.kind == "file" or info.type not in tarfile.SUPPORTED_TYPES
        data = _MemberData(tar, member.size if has_data else 0)
        yield member, data
        data.skip_rest()


def _member(info: tarfile.TarInfo, pending: dict[str, str]) -> Member:
    name = pending.get("path", info.name)
    size = info.size
    if "size" in pending:
        if not pending["size"].isdigit():
            raise InvalidAdapter(_UNREADABLE)
        size = int(pending["size"])
    if info.type in _FILE_TYPES:
        return Member(name, size, "file")
    if info.type == tarfile.DIRTYPE:
        if size:
            raise InvalidAdapter(f"'{name[:80]}' in the archive is a folder with data; archive plain files")
        return Member(name.rstrip("/"), 0, "dir")
    return Member(name, size, "other")


def _read_extended(tar: BinaryIO, info: tarfile.TarInfo) -> bytes:
    if info.size > MAX_EXTENDED_HEADER_BYTES:
        raise InvalidAdapter(
            f"the archive has an extended header of {info.size} bytes; at most {MAX_EXTENDED_HEADER_BYTES} "
            "are accepted (long names and attributes take a few hundred)"
        )
    data = _read_exactly(tar, info.size)
    _read_exactly(tar, -info.size % _BLOCK)
    return data


def _pax_records(data: bytes) -> dict[str, str]:
    """PAX records, "<length> <key>=<value>\\n" each, parsed in one pass over `data`."""
    records: dict[str, str] = {}
    position = 0
    while position < len(data) and data[position] != 0:
        space = data.find(b" ", position, position + 20)
        length = data[position:space]
        if space < 0 or not length.isdigit() or int(length) <= space - position:
            raise InvalidAdapter(_UNREADABLE)
        end = position + int(length)
        record = data[space + 1 : end]
        if end > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise InvalidAdapter(_UNREADABLE)
        key, value = record[:-1].split(b"=", 1)
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        position = end
    return records


def _read_exactly(tar: BinaryIO, size: int, *, allow_eof: bool = False) -> bytes:
    parts, left = [], size
    while left:
        chunk = tar.read(min(left, 1 << 20))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    data = b"".join(parts)
    if left and not (allow_eof and not data):
        raise InvalidAdapter(_UNREADABLE + " (it ends early)")
    return data


class _MemberData(io.RawIOBase):
    """A member's data: its `size` bytes of the archive, then the padding to a whole block."""

    def __init__(self, tar: BinaryIO, size: int):
        super().__init__()
        self._tar = tar
        self._left = size
        self._padding = -size % _BLOCK

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        wanted = self._left if size is None or size < 0 else min(size, self._left)
        chunk = _read_exactly(self._tar, wanted)
        self._left -= len(chunk)
        return chunk

    def readinto(self, buffer) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def skip_rest(self) -> None:
        while self._left:
            self.read(1 << 20)
        _read_exactly(self._tar, self._padding)
        self._padding = 0
