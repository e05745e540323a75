"""The adapter store over a shared backend: a shared folder (file://) or moto's real S3 server."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import tarfile
import time
from pathlib import Path

import pytest

from adapters.archive import LimitedReader
from adapters.blobs import BlobNotFound, LocalBlobs, S3Blobs, open_blobs
from adapters.errors import AdapterTooLarge, InvalidAdapter, StoreUnavailable
from adapters.store import AdapterStore, copy_folder, extract_tarball
from adapters.validate import content_hash, validate_adapter
from tests.adapter_files import TINY_BASE, make_adapter
from tests.security import bombs as bomb_parts

BACKENDS = ["file", "s3"]


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path) -> str:
    """A --store-url for each backend; only the s3 one starts moto."""
    if request.param == "s3":
        return request.getfixturevalue("s3_env").url
    shared = tmp_path / "shared"
    shared.mkdir()
    return f"file://{shared}"


class ErrorCounter:
    """Stands in for the server's store-error metric."""

    def __init__(self):
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def make_store(root: Path, url: str | None) -> tuple[AdapterStore, ErrorCounter]:
    errors = ErrorCounter()
    return AdapterStore(root, open_blobs(url), on_error=errors), errors


def register(store: AdapterStore, source: Path) -> str:
    """What the registry does: stage a copy, validate it, commit it; returns the content hash."""
    staging = store.new_staging()
    copy_folder(source, staging, 10_000_000)
    spec = validate_adapter(staging, TINY_BASE, max_rank=16)
    store.commit(staging, spec.content_hash)
    return spec.content_hash


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def tar_of(files: dict[str, bytes], *, link: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            archive.addfile(info)
    return buffer.getvalue()


def cache_entries(store: AdapterStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name != ".staging")


# -- sharing through the backend ---------------------------------------------------------------


def test_a_second_process_fetches_the_same_files(store_url, tmp_path):
    source = make_adapter(tmp_path / "source")
    first, _ = make_store(tmp_path / "one", store_url)
    digest = register(first, source)
    second, errors = make_store(tmp_path / "two", store_url)
    assert not second.has_local(digest)

    path = second.ensure_local(digest)

    assert path == tmp_path / "two" / digest and second.has_local(digest)
    assert files_of(path) == files_of(source)
    assert content_hash(path) == digest == validate_adapter(path, TINY_BASE, max_rank=16).content_hash
    assert all(entry.stat().st_mode & 0o222 == 0 for entry in path.iterdir())  # read-only
    assert list((tmp_path / "two" / ".staging").iterdir()) == []
    assert errors.count == 0


def test_a_cached_adapter_is_served_without_the_backend(store_url, tmp_path):
    first, _ = make_store(tmp_path / "one", store_url)
    digest = register(first, make_adapter(tmp_path / "source"))
    second, _ = make_store(tmp_path / "two", store_url)
    path = second.ensure_local(digest)
    second.blobs.delete(f"adapters/{digest}.tar")

    assert second.ensure_local(digest) == path


def test_the_same_files_make_the_same_object_bytes(tmp_path):
    """The tar is deterministic, so two processes racing to upload write identical objects."""
    shared_one, shared_two = tmp_path / "shared-one", tmp_path / "shared-two"
    shared_one.mkdir(), shared_two.mkdir()
    first, _ = make_store(tmp_path / "one", f"file://{shared_one}")
    digest = register(first, make_adapter(tmp_path / "source-one"))
    time.sleep(1.1)  # different file times must not matter
    second, _ = make_store(tmp_path / "two", f"file://{shared_two}")
    assert register(second, make_adapter(tmp_path / "source-two")) == digest

    key = f"adapters/{digest}.tar"
    assert (shared_one / key).read_bytes() == (shared_two / key).read_bytes()


@pytest.mark.parametrize("tamper", ["other-files", "garbage", "symlink", "pickle", "empty"])
def test_a_tampered_object_is_refused_and_nothing_is_cached(store_url, tmp_path, tamper):
    first, _ = make_store(tmp_path / "one", store_url)
    source = make_adapter(tmp_path / "source")
    digest = register(first, source)
    files = files_of(source)
    config = json.loads(files["adapter_config.json"])
    replacement = {
        "other-files": tar_of(files | {"adapter_config.json": json.dumps(config | {"lora_alpha": 99}).encode()}),
        "garbage": b"\x00not a tar" * 100,
        "symlink": tar_of(files, link="README.md"),
        "pickle": tar_of(files | {"adapter_model.bin": b"\x80\x04K\x01."}),
        "empty": b"",
    }[tamper]
    key = f"adapters/{digest}.tar"
    tampered = tmp_path / "tampered.tar"
    tampered.write_bytes(replacement)
    first.blobs.delete(key)
    first.blobs.put(key, tampered)
    second, errors = make_store(tmp_path / "two", store_url)

    with pytest.raises(InvalidAdapter, match="do not match their content hash"):
        second.ensure_local(digest)

    assert not second.has_local(digest)
    assert cache_entries(second) == []
    assert list((tmp_path / "two" / ".staging").iterdir()) == []
    assert errors.count == 1


def test_a_missing_object_is_a_store_failure(store_url, tmp_path):
    store, errors = make_store(tmp_path / "one", store_url)
    with pytest.raises(StoreUnavailable, match="not in the store"):
        store.ensure_local("0" * 64)
    assert errors.count == 1 and cache_entries(store) == []


def test_committing_again_uploads_what_an_earlier_commit_could_not(store_url, tmp_path):
    store, _ = make_store(tmp_path / "one", store_url)
    source = make_adapter(tmp_path / "source")
    digest = register(store, source)
    store.blobs.delete(f"adapters/{digest}.tar")

    assert register(store, source) == digest
    assert store.blobs.exists(f"adapters/{digest}.tar")


def test_removing_unreferenced_folders_keeps_the_shared_objects(store_url, tmp_path):
    store, _ = make_store(tmp_path / "one", store_url)
    kept = register(store, make_adapter(tmp_path / "kept"))
    dropped = register(store, make_adapter(tmp_path / "dropped", seed=1))

    assert store.remove_unreferenced({kept}) == 1

    assert cache_entries(store) == [kept]
    assert store.blobs.exists(f"adapters/{kept}.tar") and store.blobs.exists(f"adapters/{dropped}.tar")
    assert store.remove_unreferenced(set()) == 1
    assert files_of(store.ensure_local(dropped)) == files_of(tmp_path / "dropped")


# -- without a shared backend ------------------------------------------------------------------


def test_a_local_store_has_no_backend_to_fetch_from(tmp_path):
    store, errors = make_store(tmp_path / "adapters", str(tmp_path / "adapters"))
    assert store.blobs is None
    digest = register(store, make_adapter(tmp_path / "source"))
    assert store.ensure_local(digest) == tmp_path / "adapters" / digest

    with pytest.raises(InvalidAdapter, match="missing from the store"):
        store.ensure_local("1" * 64)
    assert errors.count == 0


@pytest.mark.parametrize("bad", ["../../etc", "ABC" * 21 + "D", "", "0" * 63, "0" * 64 + "\n"])
def test_a_content_hash_cannot_name_another_folder(tmp_path, bad):
    store, _ = make_store(tmp_path / "adapters", None)
    with pytest.raises(InvalidAdapter, match="64 lowercase hex digits"):
        store.ensure_local(bad)


def test_content_hash_is_the_hash_validation_reports(tmp_path):
    folder = make_adapter(tmp_path / "adapter")
    (folder / "README.md").write_text("notes")
    assert content_hash(folder) == validate_adapter(folder, TINY_BASE, max_rank=16).content_hash
    (folder / "README.md").write_text("other notes")
    assert (
        content_hash(folder) != validate_adapter(make_adapter(tmp_path / "plain"), TINY_BASE, max_rank=16).content_hash
    )


# -- the backend down --------------------------------------------------------------------------


def test_with_s3_down_cached_adapters_resolve_and_cold_ones_fail_cleanly(moto_server, s3_env, tmp_path):
    first, _ = make_store(tmp_path / "one", s3_env.url)
    warm = register(first, make_adapter(tmp_path / "warm"))
    cold = register(first, make_adapter(tmp_path / "cold", seed=1))
    second, errors = make_store(tmp_path / "two", s3_env.url)
    second.ensure_local(warm)

    moto_server.stop()
    try:
        assert second.ensure_local(warm) == tmp_path / "two" / warm
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as raised:
            second.ensure_local(cold)
        assert time.monotonic() - started < 15  # short timeouts, one retry: the client gets its 503 soon
        assert errors.count == 1
        with pytest.raises(StoreUnavailable) as upload_failed:
            register(second, make_adapter(tmp_path / "new", seed=2))
        assert errors.count == 2
    finally:
        moto_server.start()

    for message in (raised.value.message, str(raised.value), upload_failed.value.message):
        assert message == "the adapter store is unreachable"
        for secret in (s3_env.endpoint_url, "127.0.0.1", str(moto_server.port), s3_env.bucket, str(tmp_path)):
            assert secret not in message
    assert raised.value.retry_after > 0
    assert cache_entries(second) == sorted(
        [warm, validate_adapter(tmp_path / "new", TINY_BASE, max_rank=16).content_hash]
    )


def test_with_the_shared_folder_gone_a_cold_adapter_fails_cleanly(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    first, _ = make_store(tmp_path / "one", f"file://{shared}")
    digest = register(first, make_adapter(tmp_path / "source"))
    second, errors = make_store(tmp_path / "two", f"file://{shared}")
    shared.rename(tmp_path / "unmounted")

    with pytest.raises(StoreUnavailable) as raised:
        second.ensure_local(digest)
    assert raised.value.message == "the adapter store is unreachable" and str(tmp_path) not in str(raised.value)
    with pytest.raises(StoreUnavailable):
        register(second, make_adapter(tmp_path / "new", seed=3))
    assert errors.count == 2
    assert not shared.exists()  # an unmounted volume is not silently replaced by a local folder


# -- the Blobs contract ------------------------------------------------------------------------


@pytest.fixture
def blobs(store_url):
    return open_blobs(store_url)


def test_put_get_exists_delete(blobs, tmp_path):
    source, dest = tmp_path / "source", tmp_path / "dest"
    source.write_bytes(b"one" * 100_000)
    assert not blobs.exists("adapters/a.tar")

    blobs.put("adapters/a.tar", source)
    assert blobs.exists("adapters/a.tar")
    blobs.get("adapters/a.tar", dest)
    assert dest.read_bytes() == source.read_bytes()

    blobs.delete("adapters/a.tar")
    blobs.delete("adapters/a.tar")  # deleting what is gone is no error
    assert not blobs.exists("adapters/a.tar")
    with pytest.raises(BlobNotFound):
        blobs.get("adapters/a.tar", dest)


def test_put_leaves_an_existing_object_alone(blobs, tmp_path):
    first, second, dest = tmp_path / "first", tmp_path / "second", tmp_path / "dest"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    blobs.put("adapters/a.tar", first)
    blobs.put("adapters/a.tar", second)
    blobs.get("adapters/a.tar", dest)
    assert dest.read_bytes() == b"first"


def test_a_failed_local_put_leaves_no_partial_object(tmp_path):
    blobs = LocalBlobs(tmp_path)
    with pytest.raises(StoreUnavailable):
        blobs.put("adapters/a.tar", tmp_path / "no-such-source")
    assert not blobs.exists("adapters/a.tar")
    assert list((tmp_path / "adapters").iterdir()) == []


@pytest.mark.parametrize("key", ["../escape", "/abs", "adapters/../../x", "a//b", "", "adapters/x.tar\n"])
def test_keys_stay_inside_the_store(tmp_path, key):
    with pytest.raises(ValueError):
        LocalBlobs(tmp_path).exists(key)


def test_describe_names_the_place_without_credentials(s3_env):
    described = open_blobs(s3_env.url).describe()
    assert described == f"s3://{s3_env.bucket}/shared"
    assert "test" not in described and s3_env.endpoint_url not in described


# -- --store-url parsing -----------------------------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch):
    """Credentials in the environment, so that building a client probes no instance metadata."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.mark.parametrize("url", [None, "", "/var/lib/lora-gateway/adapters", "relative/adapters"])
def test_a_plain_folder_has_no_shared_backend(url):
    assert open_blobs(url) is None


@pytest.mark.parametrize(
    ("url", "root"),
    [("file:///shared/adapters", "/shared/adapters"), ("file://localhost/shared/a%20b", "/shared/a b")],
)
def test_a_file_url_is_a_shared_folder(url, root):
    blobs = open_blobs(url)
    assert isinstance(blobs, LocalBlobs) and blobs.root == Path(root)
    assert blobs.describe() == f"file://{root}"


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [("s3://adapters", "adapters", ""), ("s3://my.bucket-1/a/b/", "my.bucket-1", "a/b"), ("S3://lgw/x", "lgw", "x")],
)
def test_an_s3_url_is_a_bucket_and_prefix(aws_env, url, bucket, prefix):
    blobs = open_blobs(url)
    assert isinstance(blobs, S3Blobs) and (blobs.bucket, blobs.prefix) == (bucket, prefix)


@pytest.mark.parametrize(
    "url",
    [
        "http://user:hunter2@example.com/adapters",
        "gs://bucket/prefix?token=hunter2",
        "s3://AKIAEXAMPLE:hunter2@bucket/prefix",
        "s3://hunter2@bucket",
        "s3://bucket:9000/prefix",
        "s3://Bad_Bucket",
        "s3://",
        "s3://bucket/pre fix",
        "s3://bucket/p?x=hunter2",
        "file://relative/adapters",
        "file:relative",
        "file://user:hunter2@localhost/shared",
        "ftp://[::1",
    ],
)
def test_a_bad_store_url_names_the_flag_and_echoes_no_credentials(aws_env, url):
    with pytest.raises(ValueError) as raised:
        open_blobs(url)
    message = str(raised.value)
    assert "--store-url" in message and "file:///" in message and "s3://bucket" in message
    assert "hunter2" not in message and "AKIAEXAMPLE" not in message and "user" not in message


# -- archives are read within bounds -----------------------------------------------------------


def staged_tarball(tmp_path: Path, archive: bytes, max_bytes: int = 10_000_000) -> dict[str, bytes]:
    """What an upload does: extract into a staging folder; returns the files that arrived."""
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    extract_tarball(io.BytesIO(archive), staging, max_bytes)
    return {path.name: path.read_bytes() for path in staging.iterdir()}


def tar_in_format(files: dict[str, bytes], tar_format: int, *, folders: int = 0, pax: dict | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tar_format) as archive:
        for index in range(folders):
            info = tarfile.TarInfo(f"adapter/{index}")
            info.type = tarfile.DIRTYPE
            archive.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = pax or {}
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_archives_of_each_tar_format_unpack(tmp_path, tar_format):
    files = files_of(make_adapter(tmp_path / "adapter"))
    long_folder = "a" * 150 + "/"  # past ustar's 100-byte name: a GNU long name, or a PAX path
    fields = {"comment": "x" * 1000} if tar_format == tarfile.PAX_FORMAT else None
    archive = tar_in_format({long_folder + name: data for name, data in files.items()}, tar_format, pax=fields)
    assert staged_tarball(tmp_path, archive) == files


def test_a_git_archive_global_header_is_accepted(tmp_path):
    files = files_of(make_adapter(tmp_path / "adapter"))
    record = b"52 comment=0123456789012345678901234567890123456789\n"
    archive = bomb_parts.tar_header("pax_global_header", len(record), tarfile.XGLTYPE) + bomb_parts.padded(record)
    assert staged_tarball(tmp_path, archive + tar_of(files)) == files


@pytest.mark.parametrize("count, refused", [(58, False), (63, True)])
def test_an_archive_holds_at_most_64_entries_folders_included(tmp_path, count, refused):
    files = files_of(make_adapter(tmp_path / "adapter"))
    archive = tar_in_format(
        {f"adapter/{name}": data for name, data in files.items()}, tarfile.USTAR_FORMAT, folders=count
    )
    if not refused:
        assert staged_tarball(tmp_path, archive) == files
        return
    with pytest.raises(InvalidAdapter, match="more than 64 entries") as caught:
        staged_tarball(tmp_path, archive)
    assert type(caught.value) is InvalidAdapter  # a 400: the archive's shape, not its size


@pytest.mark.parametrize("typeflag", [tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME])
def test_an_extended_header_over_64_kib_is_refused_before_it_is_read(tmp_path, typeflag):
    # It declares 1 GiB and carries none of it: refused at its 512-byte header, not at the data's end.
    archive = bomb_parts.tar_header("././@LongLink", 1 << 30, typeflag)
    with pytest.raises(InvalidAdapter, match=f"extended header of {1 << 30} bytes; at most 65536"):
        staged_tarball(tmp_path, archive)
    # One of exactly 64 KiB is read; the files after it arrive.
    files = files_of(make_adapter(tmp_path / "adapter"))
    size = 64 * 1024
    if typeflag == tarfile.GNUTYPE_LONGNAME:  # the first member's name, NUL-padded
        data = b"adapter_config.json".ljust(size, b"\0")
    else:
        data = b"%d comment=" % size + b"x" * (size - 15) + b"\n"
    assert len(data) == size and next(iter(files)) == "adapter_config.json"
    archive = bomb_parts.tar_header("././@LongLink", size, typeflag) + data + tar_of(files)
    assert staged_tarball(tmp_path, archive) == files


def test_the_decompressed_stream_stops_at_the_limit(tmp_path):
    """Headers within every cap can still add up: the gzip reader is what stops them."""
    record = b"comment=" + b"x" * (60 * 1024)
    record = b"%d " % (len(record) + 7) + record + b"\n"
    one = bomb_parts.tar_header("././@PaxHeader", len(record), tarfile.XHDTYPE) + bomb_parts.padded(record)
    archive = gzip.compress(one * 20 + bytes(1024))  # 20 headers of 60 KiB: 1.2 MiB of tar, a 4 KiB limit
    with pytest.raises(AdapterTooLarge, match="unpacks to more than"):
        staged_tarball(tmp_path, archive, max_bytes=4096)
    assert len(archive) < 64 * 1024


def test_the_limited_reader_decompresses_no_more_than_its_limit():
    bomb = gzip.GzipFile(fileobj=io.BytesIO(bomb_parts.gzip_bomb(1024)))
    reader = LimitedReader(bomb, 3 << 20)
    with bomb_parts.peak_rss_growth() as growth, pytest.raises(AdapterTooLarge):
        while reader.read(1 << 20):
            pass
    assert reader.count == (3 << 20) + 1 and bomb.tell() == reader.count
    assert growth["bytes"] < 64 << 20


@pytest.mark.parametrize(
    "archive, phrase",
    [
        (bomb_parts.tar_header("sparse", 0, tarfile.GNUTYPE_SPARSE), "sparse file"),
        (lzma.compress(b"\0" * 1024), "bzip2 and xz archives are not accepted"),
        (bomb_parts.tar_header("adapter/", 512, tarfile.DIRTYPE) + bytes(512), "a folder with data"),
        (b"\x1f\x8b" + b"not gzip" * 100, "not a readable .tar.gz"),
        (bomb_parts.tar_header("adapter_config.json", 4096, tarfile.REGTYPE) + b"{}", "ends early"),
    ],
    ids=["sparse", "xz", "folder-with-data", "bad-gzip", "truncated"],
)
def test_archives_tar_would_misread_are_refused(tmp_path, archive, phrase):
    with pytest.raises(InvalidAdapter, match=phrase):
        staged_tarball(tmp_path, archive)


def test_a_pax_bomb_in_the_shared_store_is_refused_at_its_header(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    first, _ = make_store(tmp_path / "one", f"file://{shared}")
    digest = register(first, make_adapter(tmp_path / "source"))
    (shared / f"adapters/{digest}.tar").write_bytes(bomb_parts.pax_bomb())
    second, errors = make_store(tmp_path / "two", f"file://{shared}")
    started = time.perf_counter()
    with pytest.raises(InvalidAdapter, match="do not match their content hash"):
        second.ensure_local(digest)
    assert time.perf_counter() - started < 1.0 and errors.count == 1


@pytest.mark.parametrize("entries, refused", [(64, False), (65, True)])
def test_a_folder_registered_from_a_path_holds_at_most_64_entries(tmp_path, entries, refused):
    source = make_adapter(tmp_path / "source")
    for index in range(entries - 2):
        (source / f"extra-{index}").mkdir()
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(InvalidAdapter, match="more than 64 entries" if refused else "'extra-0' is not a plain file"):
        copy_folder(source, staging, 10_000_000)
