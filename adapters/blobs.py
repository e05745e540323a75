"""Where several gateway processes keep adapter files they share: a folder, or an S3 bucket.

Objects are named by content hash and never change, so a backend only has to make each `put`
all-or-nothing; it never has to order or merge writers. Every backend failure surfaces as
StoreUnavailable with a fixed message: endpoints, paths, keys and credentials stay in the logs.

Each object has a modified time, which the store sweep reads (adapters/retention.py): a new
object, or one `touch`ed because a new row is about to name it again, is never collected.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from adapters.errors import StoreUnavailable

logger = logging.getLogger(__name__)

UNREACHABLE = "the adapter store is unreachable"
_KEY_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# AWS's rules for new buckets, which MinIO enforces too.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_ACCEPTED = "--store-url takes a local folder, file:///absolute/path or s3://bucket/optional/prefix"
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}


class BlobNotFound(StoreUnavailable):
    """No object by that key: to a client, a catalog entry the store cannot back is unavailable."""

    def __init__(self) -> None:
        super().__init__("the object is not in the adapter store")


class Blobs(Protocol):
    """Immutable objects by key, shared by every gateway process."""

    def put(self, key: str, source: Path) -> None:
        """Store source's bytes under key, all or nothing; a key that exists is left alone."""

    def get(self, key: str, dest: Path) -> None:
        """Write the object's bytes to dest; BlobNotFound when there is none."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def list(self, prefix: str) -> list[tuple[str, float]]:
        """Every object whose key starts with `prefix` ("files/"), with its modified time (epoch seconds)."""

    def modified_at(self, key: str) -> float | None:
        """The object's modified time; None when there is none."""

    def touch(self, key: str) -> bool:
        """Make the object's modified time now; False when there is none."""

    def describe(self) -> str:
        """Where the objects are, for logs: scheme and bucket or folder, never credentials."""


class LocalBlobs:
    """Objects as files under a folder, typically an NFS or ReadWriteMany volume."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def put(self, key: str, source: Path) -> None:
        final = self._path(key)
        with self._failures("put"):
            if final.is_file():
                return
            # Creating the root itself would hide an unmounted volume behind a local folder.
            if not self.root.is_dir():
                raise FileNotFoundError("the store's root folder is missing")
            final.parent.mkdir(parents=True, exist_ok=True)
            # A temporary file in the same folder, so that os.replace is one atomic rename.
            partial = final.parent / f".{final.name}.{uuid.uuid4().hex}.partial"
            try:
                with open(source, "rb") as reader, open(partial, "wb") as writer:
                    shutil.copyfileobj(reader, writer, 1 << 20)
                    writer.flush()
                    os.fsync(writer.fileno())
                os.replace(partial, final)
            finally:
                partial.unlink(missing_ok=True)
            _fsync_folder(final.parent)  # so that a crash cannot lose the rename

    def get(self, key: str, dest: Path) -> None:
        path = self._path(key)
        with self._failures("get"):
            try:
                reader = open(path, "rb")
            except FileNotFoundError:
                if not self.root.is_dir():
                    raise  # the volume is gone, not the object
                raise BlobNotFound() from None
            with reader, open(dest, "wb") as writer:
                shutil.copyfileobj(reader, writer, 1 << 20)

    def exists(self, key: str) -> bool:
        path = self._path(key)
        with self._failures("exists"):
            return path.is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._failures("delete"):
            path.unlink(missing_ok=True)

    def list(self, prefix: str) -> list[tuple[str, float]]:
        folder = self.root.joinpath(*_check_key(prefix.rstrip("/")))
        listed = []
        with self._failures("list"):
            if not self.root.is_dir():
                raise FileNotFoundError("the store's root folder is missing")
            for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
                if path.name.startswith(".") or not path.is_file():  # .partial uploads
                    continue
                listed.append(("/".join(path.relative_to(self.root).parts), path.stat().st_mtime))
        return listed

    def modified_at(self, key: str) -> float | None:
        path = self._path(key)
        with self._failures("stat"):
            try:
                return path.stat().st_mtime
            except FileNotFoundError:
                if not self.root.is_dir():
                    raise
                return None

    def touch(self, key: str) -> bool:
        path = self._path(key)
        with self._failures("touch"):
            try:
                os.utime(path)
            except FileNotFoundError:
                if not self.root.is_dir():
                    raise
                return False
        return True

    def describe(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key))

    @contextmanager
    def _failures(self, operation: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            logger.warning("adapter store %s: %s failed (%s)", self.describe(), operation, type(exc).__name__)
            raise StoreUnavailable(UNREACHABLE) from None


@cache
def _api_models():
    """botocore's loader of its API models, shared by every S3 client of this process.

    A new session parses S3's model (JSON files of several MB) again: 0.15 s a client, against
    0.05 s with the loader shared. Only the parsed models are shared; each client still has a
    session of its own, which resolves its own endpoint and credentials.
    """
    import botocore.session

    return botocore.session.get_session().get_component("data_loader")


class S3Blobs:
    """Objects in an S3-compatible bucket; endpoint and credentials come from the AWS environment."""

    def __init__(self, bucket: str, prefix: str = ""):
        import boto3  # the optional .[s3] extra
        import botocore.session
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # Short timeouts and one retry: a request waiting on the store should get its 503 quickly.
        config = Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"})
        try:
            session = botocore.session.get_session()
            session.register_component("data_loader", _api_models())
            self._client = boto3.session.Session(botocore_session=session).client("s3", config=config)
        except (BotoCoreError, ValueError) as exc:
            # botocore's own messages may quote AWS_ENDPOINT_URL, which may carry credentials.
            raise ValueError(
                f"--store-url {self.describe()}: cannot set up the S3 client ({type(exc).__name__}); "
                "check AWS_ENDPOINT_URL and the other AWS_* settings"
            ) from None

    def put(self, key: str, source: Path) -> None:
        if self.exists(key):
            return
        with self._failures("put"), open(source, "rb") as body:
            # One PUT: S3 shows an object only once the whole of it has arrived.
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body)

    def get(self, key: str, dest: Path) -> None:
        with self._failures("get"):
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            body = response["Body"]  # not `with`: StreamingBody's __enter__ gives the raw urllib3 stream
            try:
                with open(dest, "wb") as writer:
                    for chunk in body.iter_chunks(1 << 20):
                        writer.write(chunk)
            finally:
                body.close()

    def exists(self, key: str) -> bool:
        try:
            with self._failures("exists"):
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except BlobNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        with self._failures("delete"):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str) -> list[tuple[str, float]]:
        listed = []
        start = len(self.prefix) + 1 if self.prefix else 0
        with self._failures("list"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix.rstrip("/")) + "/"
            )
            for page in pages:
                for item in page.get("Contents", []):
                    listed.append((item["Key"][start:], item["LastModified"].timestamp()))
        return listed

    def modified_at(self, key: str) -> float | None:
        try:
            with self._failures("stat"):
                head = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except BlobNotFound:
            return None
        return head["LastModified"].timestamp()

    def touch(self, key: str) -> bool:
        # S3 has no utime: copying an object onto itself with new metadata gives it a new LastModified.
        source = {"Bucket": self.bucket, "Key": self._key(key)}
        try:
            with self._failures("touch"):
                self._client.copy_object(
                    Bucket=self.bucket, Key=self._key(key), CopySource=source, MetadataDirective="REPLACE"
                )
        except BlobNotFound:
            return False
        return True

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, key: str) -> str:
        return "/".join([self.prefix, *_check_key(key)] if self.prefix else _check_key(key))

    @contextmanager
    def _failures(self, operation: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND_CODES:
                raise BlobNotFound() from None
            logger.warning("adapter store %s: %s failed (%s)", self.describe(), operation, code or "ClientError")
            raise StoreUnavailable(UNREACHABLE) from None
        except (BotoCoreError, OSError) as exc:
            logger.warning("adapter store %s: %s failed (%s)", self.describe(), operation, type(exc).__name__)
            raise StoreUnavailable(UNREACHABLE) from None


def open_blobs(url: str | None) -> Blobs | None:
    """The shared backend --store-url names; None for a plain folder, which is then the store itself."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:  # urllib's message quotes the URL
        raise ValueError(f"{_ACCEPTED}; this value is not a readable URL") from None
    if not parts.scheme:
        return None
    scheme = parts.scheme.lower()
    if "@" in parts.netloc:
        raise ValueError(
            f"{_ACCEPTED}; credentials belong in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, not in the URL"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"{_ACCEPTED}, without a query or fragment")
    if scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ValueError(f"{_ACCEPTED}; a file URL needs an absolute path, as in file:///shared/adapters")
        return LocalBlobs(Path(path))
    if scheme == "s3":
        # netloc, not hostname: hostname lowercases, and a port means an endpoint was put here.
        if not _BUCKET.fullmatch(parts.netloc):
            raise ValueError(
                f"{_ACCEPTED}; the bucket is 3-63 lowercase letters, digits, '.' or '-' "
                "(set the endpoint with AWS_ENDPOINT_URL)"
            )
        prefix = unquote(parts.path).strip("/")
        if prefix and not all(_KEY_PART.fullmatch(part) for part in prefix.split("/")):
            raise ValueError(f"{_ACCEPTED}; the prefix is '/'-separated names of letters, digits, '.', '_' and '-'")
        return S3Blobs(parts.netloc, prefix)
    # Only the scheme is echoed: the rest of the URL may hold a token or a password.
    raise ValueError(f"{_ACCEPTED}; '{scheme[:20]}://' is not one of them")


def _check_key(key: str) -> list[str]:
    parts = key.split("/")
    if not all(_KEY_PART.fullmatch(part) for part in parts):
        raise ValueError("an object key is '/'-separated names of letters, digits, '.', '_' and '-'")
    return parts


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
