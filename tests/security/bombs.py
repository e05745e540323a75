"""Hostile archives and JSON, built small: what tests/security and the unit tests send."""

from __future__ import annotations

import gzip
import io
import resource
import struct
import tarfile
import zlib
from contextlib import contextmanager

import pytest


@contextmanager
def peak_rss_growth():
    """Bytes the process's peak RSS grew by inside the block, in growth["bytes"].

    ru_maxrss is a high-water mark, so an earlier test's peak would hide this one's: Linux resets it
    through /proc/self/clear_refs ("5"), which resets ru_maxrss with it.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError as exc:
        pytest.fail(f"measuring peak RSS needs Linux's /proc/self/clear_refs (writing '5' resets it): {exc}")
    growth = {"bytes": 0}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        yield growth
    finally:
        growth["bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # KiB on Linux


def tar_header(name: str, size: int, typeflag: bytes) -> bytes:
    """One 512-byte ustar header."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = typeflag
    info.mode = 0o755 if typeflag == tarfile.DIRTYPE else 0o644
    return info.tobuf(tarfile.USTAR_FORMAT)


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def pax_bomb() -> bytes:
    """A tar whose one PAX extended header is 199 KiB.

    The records ("2 2 2 ... =") overlap, so CPython 3.11's parser stores a new keyword, nearly
    as long as the header, every two bytes (quadratic memory); the run of digits after them makes
    its hdrcharset search quadratic in time.
    """
    records = b"2 " * 24_000 + b"=\n"
    payload = records + b"9" * (199 * 1024 - len(records))
    config = b"{}"
    return (
        tar_header("././@PaxHeader", len(payload), tarfile.XHDTYPE)
        + padded(payload)
        + tar_header("adapter_config.json", len(config), tarfile.REGTYPE)
        + padded(config)
        + b"\0" * 1024
    )


def nested_json(size: int) -> bytes:
    """Empty objects nested as deep as `size` bytes allow: {"":{"":...{}...}}."""
    depth = (size - 2) // 5
    return b'{"":' * depth + b"{}" + b"}" * depth


def directory_bomb(entries: int = 200_000) -> bytes:
    """A .tar.gz of `entries` empty directories and nothing else."""
    template = bytearray(tar_header("d0000000/", 0, tarfile.DIRTYPE))
    raw = io.BytesIO()
    for index in range(entries):
        block = template.copy()
        block[0:9] = b"d%07d/" % index
        block[148:156] = b"        "
        block[148:156] = b"%06o\0 " % sum(block)
        raw.write(block)
    raw.write(b"\0" * 1024)
    return gzip.compress(raw.getvalue(), compresslevel=6)


def gzip_bomb(decompressed_mib: int = 1024) -> bytes:
    """A .tar.gz of about 1 MiB that unpacks to 1 GiB: one extended (PAX) header of zeros.

    Built from one compressed MiB of zeros repeated: each piece is flushed with Z_FULL_FLUSH,
    so it refers to nothing before it and may follow any other.
    """

    def raw_deflate(data: bytes, mode: int) -> bytes:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        return compressor.compress(data) + compressor.flush(mode)

    first = tar_header("././@PaxHeader", decompressed_mib << 20, tarfile.XHDTYPE)
    zeros = bytes(1 << 20)
    crc = zlib.crc32(first)
    for _ in range(decompressed_mib):
        crc = zlib.crc32(zeros, crc)
    size = len(first) + (decompressed_mib << 20)
    return (
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # gzip: deflate, no name, no mtime
        + raw_deflate(first, zlib.Z_FULL_FLUSH)
        + raw_deflate(zeros, zlib.Z_FULL_FLUSH) * decompressed_mib
        + raw_deflate(b"", zlib.Z_FINISH)
        + struct.pack("<II", crc, size & 0xFFFFFFFF)
    )


def safetensors_with_header(json_header: bytes) -> bytes:
    """A safetensors file of that header and no data."""
    return struct.pack("<Q", len(json_header)) + json_header
