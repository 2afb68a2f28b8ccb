"""The storage interface, run against a local folder and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest
from s3server import WeedS3Server, free_ports

from flows.settings import Settings
from flows.store import (
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    StorageUnavailable,
    store_from_settings,
)
from flows.store_local import LocalStore, verify_link
from flows.store_s3 import S3Store

SECRET = b"test-link-secret"
PUBLIC_URL = "http://dreamflow.test:8000"
BAD_KEYS = ["../x", "/abs", "a//b", "a/./b", "a/../b", "a\\b", "", "a/", ".", "a\nb", "x" * 513]


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "storage", PUBLIC_URL, SECRET)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    """Each behavioural test runs once per backend."""
    return request.getfixturevalue(f"{request.param}_store")


def _fill(store: ObjectStore) -> None:
    for key in ["trainings/a/x.txt", "trainings/a/sub/y.txt", "trainings/ab/z.txt", "uploads/q.png"]:
        store.put_bytes(key, key.encode())


# --------------------------------------------------------------------------- both backends


def test_bytes_round_trip_and_overwrite(store: ObjectStore) -> None:
    store.put_bytes("uploads/one.bin", b"\x00first\xff")
    assert store.get_bytes("uploads/one.bin") == b"\x00first\xff"
    store.put_bytes("uploads/one.bin", b"second")
    assert store.get_bytes("uploads/one.bin") == b"second"
    assert store.exists("uploads/one.bin")
    assert store.size("uploads/one.bin") == 6


def test_file_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    payload = os.urandom(1024 * 1024 + 7)
    source = tmp_path / "lora.safetensors"
    source.write_bytes(payload)
    store.put_file("trainings/t1/exports/lora.safetensors", source)
    dest = tmp_path / "out" / "nested" / "copy.safetensors"
    assert store.get_file("trainings/t1/exports/lora.safetensors", dest) == dest
    assert dest.read_bytes() == payload
    assert store.size("trainings/t1/exports/lora.safetensors") == len(payload)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.safetensors"]


def test_empty_object(store: ObjectStore) -> None:
    store.put_bytes("trainings/t1/empty", b"")
    assert store.get_bytes("trainings/t1/empty") == b""
    assert store.size("trainings/t1/empty") == 0


def test_list_is_recursive_sorted_and_scoped(store: ObjectStore) -> None:
    _fill(store)
    assert store.list("trainings/a/") == ["trainings/a/sub/y.txt", "trainings/a/x.txt"]
    assert store.list("trainings/") == ["trainings/a/sub/y.txt", "trainings/a/x.txt", "trainings/ab/z.txt"]
    assert store.list("trainings/a") == ["trainings/a/sub/y.txt", "trainings/a/x.txt", "trainings/ab/z.txt"]
    assert store.list("") == sorted(store.list("trainings/") + ["uploads/q.png"])
    assert store.list("nothing/") == []


def test_delete_prefix_removes_only_that_prefix(store: ObjectStore) -> None:
    _fill(store)
    assert store.delete_prefix("trainings/a/") == 2
    assert store.list("") == ["trainings/ab/z.txt", "uploads/q.png"]
    assert store.delete_prefix("trainings/a/") == 0
    assert store.get_bytes("trainings/ab/z.txt") == b"trainings/ab/z.txt"


@pytest.mark.parametrize("prefix", ["", "trainings/a", "../", "/trainings/"])
def test_delete_prefix_rejects_non_folder_prefixes(store: ObjectStore, prefix: str) -> None:
    with pytest.raises(InvalidKey):
        store.delete_prefix(prefix)


def test_delete_single_object(store: ObjectStore) -> None:
    _fill(store)
    store.delete("trainings/a/x.txt")
    assert not store.exists("trainings/a/x.txt")
    assert store.list("trainings/a/") == ["trainings/a/sub/y.txt"]
    store.delete("trainings/a/x.txt")  # deleting again is not an error


def test_missing_objects(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("trainings/t1/present", b"x")
    assert not store.exists("trainings/t1/absent")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("trainings/t1/absent")
    with pytest.raises(ObjectNotFound):
        store.get_file("trainings/t1/absent", tmp_path / "dest")
    with pytest.raises(ObjectNotFound):
        store.size("trainings/t1/absent")
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_invalid_keys_are_refused(store: ObjectStore, key: str, tmp_path: Path) -> None:
    calls = [
        lambda: store.put_bytes(key, b"x"),
        lambda: store.put_file(key, tmp_path / "unused"),
        lambda: store.get_bytes(key),
        lambda: store.get_file(key, tmp_path / "unused"),
        lambda: store.exists(key),
        lambda: store.size(key),
        lambda: store.delete(key),
        lambda: store.link(key, 60),
    ]
    for call in calls:
        with pytest.raises(InvalidKey):
            call()


def test_check_passes(store: ObjectStore) -> None:
    store.check()


# --------------------------------------------------------------------------- S3 only


def test_s3_link_downloads_the_object(s3_store: S3Store) -> None:
    s3_store.put_bytes("trainings/t1/exports/lora.safetensors", b"weights")
    url = s3_store.link("trainings/t1/exports/lora.safetensors", 300)
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == b"weights"


def test_s3_expired_link_is_refused(s3_store: S3Store) -> None:
    s3_store.put_bytes("trainings/t1/out.bin", b"data")
    url = s3_store.link("trainings/t1/out.bin", 1)
    time.sleep(2.1)
    assert httpx.get(url).status_code == 403


def test_s3_tampered_link_is_refused(s3_store: S3Store) -> None:
    s3_store.put_bytes("trainings/t1/out.bin", b"data")
    url = s3_store.link("trainings/t1/out.bin", 300)
    signature = parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
    forged = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    assert httpx.get(url.replace(signature, forged)).status_code == 403
    other_key = url.replace("out.bin", "other.bin")
    assert httpx.get(other_key).status_code == 403


def test_s3_link_on_public_endpoint(s3_server: WeedS3Server, s3_store: S3Store) -> None:
    s3_store.put_bytes("trainings/t1/out.bin", b"public")
    port = s3_server.endpoint.rsplit(":", 1)[1]
    public = S3Store(
        s3_server.endpoint, s3_server.access_key, s3_server.secret_key, s3_store.bucket,
        public_endpoint=f"http://localhost:{port}",
    )
    url = public.link("trainings/t1/out.bin", 300)
    assert url.startswith(f"http://localhost:{port}/")
    assert httpx.get(url).content == b"public"


def test_s3_wrong_credentials_are_unavailable_and_say_which_settings(s3_server: WeedS3Server) -> None:
    """The store cannot serve (a 503 from the facade, not a 500), and the message says what to check."""
    for access, secret in [(s3_server.access_key, "wrong-secret"), ("nobody", s3_server.secret_key)]:
        store = S3Store(s3_server.endpoint, access, secret, f"test-{uuid.uuid4().hex[:16]}")
        with pytest.raises(StorageUnavailable, match=r"refused dreamflow's requests \((SignatureDoesNotMatch|"
                                                     r"InvalidAccessKeyId|AccessDenied)\): check DREAMFLOW_S3_ACCESS_KEY"):
            store.put_bytes("uploads/x", b"x")
        with pytest.raises(StorageUnavailable):
            store.check()


def test_s3_closed_port_is_unavailable_quickly() -> None:
    (port,) = free_ports(1)
    store = S3Store(f"127.0.0.1:{port}", "key", "secret-key", "dreamflow")
    began = time.monotonic()
    with pytest.raises(StorageUnavailable):
        store.put_bytes("uploads/x", b"x")
    with pytest.raises(StorageUnavailable):
        store.check()
    assert time.monotonic() - began < 15


def test_s3_store_survives_a_server_restart(tmp_path: Path) -> None:
    with WeedS3Server(tmp_path / "weed") as server:
        store = S3Store(server.endpoint, server.access_key, server.secret_key, "restart-test")
        store.put_bytes("trainings/t1/a", b"before")
        server.stop()
        began = time.monotonic()
        with pytest.raises(StorageUnavailable):
            store.get_bytes("trainings/t1/a")
        assert time.monotonic() - began < 15
        server.start()
        assert store.get_bytes("trainings/t1/a") == b"before"
        store.put_bytes("trainings/t1/b", b"after")
        assert store.list("trainings/") == ["trainings/t1/a", "trainings/t1/b"]


def test_s3_bucket_creation_is_race_safe(s3_server: WeedS3Server) -> None:
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    stores = [S3Store(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, bucket) for _ in range(4)]
    errors: list[BaseException] = []

    def write(index: int) -> None:
        try:
            stores[index].put_bytes(f"uploads/{index}", b"x")
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert stores[0].list("uploads/") == [f"uploads/{i}" for i in range(len(stores))]


# --------------------------------------------------------------------------- local only


def _link_params(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    return unquote(parts.path.removeprefix("/files/")), int(query["expires"][0]), query["signature"][0]


def test_local_link_verifies(local_store: LocalStore) -> None:
    local_store.put_bytes("trainings/t 1/lora.safetensors", b"w")
    url = local_store.link("trainings/t 1/lora.safetensors", 300)
    assert url.startswith(f"{PUBLIC_URL}/files/trainings/t%201/lora.safetensors?expires=")
    key, expires, signature = _link_params(url)
    assert key == "trainings/t 1/lora.safetensors"
    assert expires - time.time() == pytest.approx(300, abs=5)
    assert verify_link(SECRET, key, expires, signature)
    assert not verify_link(SECRET, key, expires, signature[:-1] + ("0" if signature[-1] != "0" else "1"))
    assert not verify_link(SECRET, "trainings/t 1/other.safetensors", expires, signature)
    assert not verify_link(SECRET, key, expires + 1, signature)
    assert not verify_link(b"another-secret", key, expires, signature)
    assert not verify_link(SECRET, key, expires, signature, now=expires + 1)
    assert local_store.local_path(key).read_bytes() == b"w"


def test_local_writes_leave_no_temp_files(local_store: LocalStore, tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(b"file")
    local_store.put_bytes("trainings/t1/a.bin", b"bytes")
    local_store.put_file("trainings/t1/b.bin", source)
    local_store.get_file("trainings/t1/a.bin", tmp_path / "dl" / "a.bin")
    assert sorted(p.name for p in (local_store.root / "trainings" / "t1").iterdir()) == ["a.bin", "b.bin"]
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["a.bin"]


def test_local_failed_write_keeps_the_old_object(local_store: LocalStore) -> None:
    local_store.put_bytes("trainings/t1/a.bin", b"old")
    with pytest.raises(TypeError):
        local_store.put_bytes("trainings/t1/a.bin", "not bytes")  # type: ignore[arg-type]
    assert local_store.get_bytes("trainings/t1/a.bin") == b"old"
    assert [p.name for p in (local_store.root / "trainings" / "t1").iterdir()] == ["a.bin"]


def test_local_write_on_a_full_disk_is_a_storage_error_in_words(
    local_store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (simulated: this machine's disk is not full) or a protected file is the store's
    failure, which the pipeline logs and survives where it can, and its text names no server path."""
    import errno

    local_store.put_bytes("trainings/t1/status.json", b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError) as raised:
        local_store.put_bytes("trainings/t1/status.json", b"new")
    assert str(raised.value) == "the store could not write status.json: no space left on device"
    assert str(local_store.root) not in str(raised.value)
    monkeypatch.undo()
    assert local_store.get_bytes("trainings/t1/status.json") == b"old"
    assert local_store.list("trainings/") == ["trainings/t1/status.json"]


def test_local_list_skips_unfinished_writes(local_store: LocalStore) -> None:
    local_store.put_bytes("trainings/t1/a.bin", b"a")
    (local_store.root / "trainings" / "t1" / ".dreamflow-tmp-0123456789abcdef-b.bin").write_bytes(b"half")
    assert local_store.list("trainings/") == ["trainings/t1/a.bin"]


def test_local_delete_prunes_empty_folders(local_store: LocalStore) -> None:
    _fill(local_store)
    local_store.delete("uploads/q.png")
    local_store.delete_prefix("trainings/")
    assert list(local_store.root.iterdir()) == []


def test_local_key_below_an_object_is_a_storage_error(local_store: LocalStore) -> None:
    local_store.put_bytes("trainings/t1", b"file")
    with pytest.raises(StorageError):
        local_store.put_bytes("trainings/t1/child", b"x")
    with pytest.raises(ObjectNotFound):
        local_store.local_path("trainings")


# --------------------------------------------------------------------------- settings


def test_store_from_settings_local(tmp_path: Path) -> None:
    store = store_from_settings(Settings(storage="local", data_dir=tmp_path, public_url="http://x.test/"))
    assert isinstance(store, LocalStore)
    assert store.root == (tmp_path / "storage").resolve()
    assert store.link("a/b", 60).startswith("http://x.test/files/a/b?")


def test_store_from_settings_s3(s3_server: WeedS3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["ENDPOINT", "ACCESS_KEY", "SECRET_KEY", "BUCKET", "SECURE", "REGION"]:
        monkeypatch.delenv(f"DREAMFLOW_S3_{name}", raising=False)
    with pytest.raises(ValueError, match="DREAMFLOW_S3_ENDPOINT"):
        store_from_settings(Settings(storage="s3", s3_access_key="a", s3_secret_key="b"))
    store = store_from_settings(Settings(
        storage="s3", s3_endpoint=s3_server.endpoint, s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key, s3_bucket=f"test-{uuid.uuid4().hex[:16]}",
    ))
    assert isinstance(store, S3Store)
    store.put_bytes("uploads/x", b"x")
    assert store.list("uploads/") == ["uploads/x"]
    port = s3_server.endpoint.rsplit(":", 1)[1]
    public = store_from_settings(Settings(
        storage="s3", s3_endpoint=s3_server.endpoint, s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key, s3_bucket=store.bucket, s3_public_endpoint=f"localhost:{port}",
    ))
    link = public.link("uploads/x", 60)  # signed for the name clients use, and valid there
    assert link.startswith(f"http://localhost:{port}/") and httpx.get(link).content == b"x"
