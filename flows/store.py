"""Artifact storage: one interface, two backends (a local directory, or S3 through ``minio``).

Keys are relative, '/'-separated paths such as ``trainings/<id>/exports/lora.safetensors``.
This module is imported by the API facade, so it uses only the standard library, ``minio``
and ``urllib3``.
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import io
import mimetypes
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import quote, unquote, urlencode, urlsplit

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

if TYPE_CHECKING:
    from flows.settings import Settings

MAX_KEY_LENGTH = 512
_TMP_PREFIX = ".dreamflow-tmp-"
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "ResourceNotFound"})
_BUCKET_TAKEN_CODES = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})


class StorageError(Exception):
    """A storage operation failed."""


class ObjectNotFound(StorageError):
    """The key names no object."""


class StorageUnavailable(StorageError):
    """The storage backend cannot be reached (the API answers 503)."""


class InvalidKey(StorageError):
    """The key is not a safe relative object path."""


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe object key, else raise :class:`InvalidKey`."""
    if not isinstance(key, str) or not key:
        raise InvalidKey(f"object key must be a non-empty string, got {key!r}")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"object key longer than {MAX_KEY_LENGTH} characters")
    if not key.isprintable() or "\\" in key:
        raise InvalidKey(f"object key has a backslash or unprintable character: {key!r}")
    if key.startswith("/"):
        raise InvalidKey(f"object key must be relative: {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKey(f"object key has an empty, '.' or '..' segment: {key!r}")
        if segment.startswith(_TMP_PREFIX):
            raise InvalidKey(f"object key segment uses the reserved prefix {_TMP_PREFIX!r}: {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it may start keys ('' means every key), else raise InvalidKey."""
    if prefix == "":
        return prefix
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def validate_dir_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a non-empty 'folder' prefix ending with '/'."""
    if not prefix or not prefix.endswith("/"):
        raise InvalidKey(f"prefix must be non-empty and end with '/': {prefix!r}")
    return validate_prefix(prefix)


def _guess_type(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


@contextmanager
def _atomic_write(dest: Path) -> Iterator[BinaryIO]:
    """A temp file next to ``dest`` (parents created) that replaces it only once fully written."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise StorageError(f"{dest} lies below an existing file") from exc
    tmp = dest.with_name(f"{_TMP_PREFIX}{secrets.token_hex(8)}-{dest.name}")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, dest)
    except IsADirectoryError as exc:
        raise StorageError(f"{dest} is an existing folder") from exc
    finally:
        tmp.unlink(missing_ok=True)


class ObjectStore(abc.ABC):
    """Where uploads and training artifacts live, addressed by validated keys."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store ``data`` under ``key``, replacing any object there."""

    @abc.abstractmethod
    def put_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        """Store the file at ``path`` under ``key`` (type guessed from its name if not given)."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Return the object's content; :class:`ObjectNotFound` if there is none."""

    @abc.abstractmethod
    def get_file(self, key: str, dest: Path) -> Path:
        """Write the object to ``dest`` atomically (parents created) and return ``dest``."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Size of the object in bytes; :class:`ObjectNotFound` if there is none."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """All keys starting with ``prefix`` (recursive), sorted."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder ``prefix`` (ends with '/'); return how many."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object under ``key``; deleting a missing object is not an error."""

    @abc.abstractmethod
    def link(self, key: str, expires_s: int) -> str:
        """A download URL valid for ``expires_s`` seconds (the object's existence is not checked)."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise :class:`StorageUnavailable` if the backend cannot be used now."""

    @abc.abstractmethod
    def key_from_link(self, url: str) -> str | None:
        """The key behind one of this store's own download links, or None for any other URL."""


# --------------------------------------------------------------------------- local directory


def sign_link(secret: bytes, key: str, expires: int) -> str:
    """The hex HMAC-SHA256 of a local download link for ``key`` valid until ``expires``."""
    message = f"{key}\n{expires}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def verify_link(secret: bytes, key: str, expires: int, signature: str, now: float | None = None) -> bool:
    """Whether ``signature`` signs ``key`` until ``expires`` and that time has not passed."""
    current = time.time() if now is None else now
    if int(expires) <= current:
        return False
    expected = sign_link(secret, key, int(expires))
    return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))


class LocalStore(ObjectStore):
    """Objects as files under ``root``; links point at the facade's ``/files/`` route."""

    def __init__(self, root: Path, public_url: str, secret: bytes) -> None:
        self.root = Path(root).expanduser().resolve()
        self.public_url = public_url.rstrip("/")
        self._secret = secret

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def local_path(self, key: str) -> Path:
        """The file holding ``key``, for serving it; :class:`ObjectNotFound` if there is none."""
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store ``data`` under ``key`` atomically (the content type is not kept locally)."""
        with _atomic_write(self._path(key)) as handle:
            handle.write(data)

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        """Copy the file at ``path`` under ``key`` atomically."""
        target = self._path(key)
        with open(path, "rb") as source, _atomic_write(target) as handle:
            shutil.copyfileobj(source, handle, 1024 * 1024)

    @contextmanager
    def _open(self, key: str) -> Iterator[BinaryIO]:
        """The object's file opened for reading; a concurrent delete reads as ObjectNotFound."""
        try:
            handle = open(self.local_path(key), "rb")
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise ObjectNotFound(key) from exc
        with handle:
            yield handle

    def get_bytes(self, key: str) -> bytes:
        """Return the object's content."""
        with self._open(key) as source:
            return source.read()

    def get_file(self, key: str, dest: Path) -> Path:
        """Copy the object to ``dest`` atomically."""
        dest = Path(dest)
        with self._open(key) as source, _atomic_write(dest) as handle:
            shutil.copyfileobj(source, handle, 1024 * 1024)
        return dest

    def exists(self, key: str) -> bool:
        """Whether a file is stored under ``key``."""
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        """Size of the object in bytes."""
        with self._open(key) as source:
            return os.fstat(source.fileno()).st_size

    def list(self, prefix: str) -> list[str]:
        """All keys starting with ``prefix``, sorted (temp files of unfinished writes excluded)."""
        validate_prefix(prefix)
        base = self.root.joinpath(*prefix.split("/")[:-1])
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirnames, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.startswith(_TMP_PREFIX) and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        """Remove the folder ``prefix`` with everything in it; return the number of objects."""
        validate_dir_prefix(prefix)
        count = len(self.list(prefix))
        folder = self.root.joinpath(*prefix.split("/")[:-1])
        if folder.is_dir():
            shutil.rmtree(folder)
            self._prune_empty_parents(folder.parent)
        return count

    def delete(self, key: str) -> None:
        """Remove the file under ``key`` if there is one."""
        path = self._path(key)
        if path.is_file():
            path.unlink(missing_ok=True)
            self._prune_empty_parents(path.parent)

    def _prune_empty_parents(self, folder: Path) -> None:
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def key_from_link(self, url: str) -> str | None:
        base = f"{self.public_url}/files/"
        if not url.startswith(base):
            return None
        return unquote(urlsplit(url).path.split("/files/", 1)[1])

    def link(self, key: str, expires_s: int) -> str:
        """A signed ``/files/`` URL on the facade, valid for ``expires_s`` seconds."""
        validate_key(key)
        expires = int(time.time()) + int(expires_s)
        query = urlencode({"expires": expires, "signature": sign_link(self._secret, key, expires)})
        return f"{self.public_url}/files/{quote(key)}?{query}"

    def check(self) -> None:
        """Raise :class:`StorageUnavailable` unless the root folder exists and is writable."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"cannot create storage folder {self.root}: {exc}") from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnavailable(f"storage folder {self.root} is not writable")


# --------------------------------------------------------------------------- S3 / MinIO


def _http_client(secure: bool) -> urllib3.PoolManager:
    """A pool with short timeouts and few retries, so a dead server fails in seconds.

    One connect retry bounds an unreachable host at ~10 s; one read retry lets an idempotent
    request survive a pooled connection the server closed (e.g. after a restart).
    """
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5.0, read=30.0),
        maxsize=10,
        cert_reqs="CERT_REQUIRED" if secure else "CERT_NONE",
        retries=urllib3.Retry(
            total=2, connect=1, read=1, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
        ),
    )


def _split_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """Accept ``host:port`` or ``http(s)://host:port``; the scheme, if given, decides TLS."""
    for scheme, is_secure in (("https://", True), ("http://", False)):
        if endpoint.startswith(scheme):
            return endpoint[len(scheme):].rstrip("/"), is_secure
    return endpoint.rstrip("/"), secure


@contextmanager
def _s3_errors(key: str | None = None) -> Iterator[None]:
    """Translate minio/urllib3 failures into this module's exceptions."""
    try:
        yield
    except S3Error as exc:
        if exc.code in _NOT_FOUND_CODES and key is not None:
            raise ObjectNotFound(key) from exc
        raise StorageError(f"S3 error {exc.code}: {exc.message}") from exc
    except (urllib3.exceptions.HTTPError, ServerError, ConnectionError) as exc:
        raise StorageUnavailable(f"S3 server unreachable or failing: {exc}") from exc
    except InvalidResponseError as exc:
        raise StorageError(f"S3 server sent an invalid response: {exc}") from exc


class S3Store(ObjectStore):
    """Objects in one bucket of an S3-compatible server (created on first use)."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str | None = None,
        public_endpoint: str | None = None,
    ) -> None:
        self.bucket = bucket
        host, secure = _split_endpoint(endpoint, secure)
        self._client = Minio(
            host, access_key=access_key, secret_key=secret_key, secure=secure,
            region=region, http_client=_http_client(secure),
        )
        self._link_client = self._client
        if public_endpoint:
            public_host, public_secure = _split_endpoint(public_endpoint, secure)
            # Presigning is offline when the region is known; links are only signed here.
            self._link_client = Minio(
                public_host, access_key=access_key, secret_key=secret_key,
                secure=public_secure, region=region or "us-east-1",
            )
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (safe when several processes race)."""
        if self._bucket_ready:
            return
        with self._bucket_lock, _s3_errors():
            if not self._client.bucket_exists(self.bucket):
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as exc:
                    if exc.code not in _BUCKET_TAKEN_CODES:
                        raise
            self._bucket_ready = True

    @contextmanager
    def _request(self, key: str | None = None) -> Iterator[Minio]:
        """The client, once the key is valid and the bucket exists, with errors translated."""
        if key is not None:
            validate_key(key)
        self.ensure_bucket()
        with _s3_errors(key):
            yield self._client

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Upload ``data`` under ``key``."""
        with self._request(key) as client:
            client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        """Upload the file at ``path`` under ``key`` (multipart when large)."""
        with self._request(key) as client:
            client.fput_object(self.bucket, key, str(path), content_type=content_type or _guess_type(Path(path)))

    @contextmanager
    def _download(self, key: str) -> Iterator[urllib3.BaseHTTPResponse]:
        """The streaming response of a GET, released afterwards."""
        with self._request(key) as client:
            response = client.get_object(self.bucket, key)
            try:
                yield response
            finally:
                response.close()
                response.release_conn()

    def get_bytes(self, key: str) -> bytes:
        """Download the object's content."""
        with self._download(key) as response:
            return response.read()

    def get_file(self, key: str, dest: Path) -> Path:
        """Download the object to ``dest`` through a temp file replaced at the end."""
        dest = Path(dest)
        with self._download(key) as response, _atomic_write(dest) as handle:
            for chunk in response.stream(1024 * 1024):
                handle.write(chunk)
        return dest

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        """Size of the object in bytes."""
        with self._request(key) as client:
            return int(client.stat_object(self.bucket, key).size or 0)

    def list(self, prefix: str) -> list[str]:
        """All keys starting with ``prefix``, sorted."""
        validate_prefix(prefix)
        with self._request() as client:
            objects = client.list_objects(self.bucket, prefix=prefix or None, recursive=True)
            return sorted(obj.object_name for obj in objects if not obj.is_dir)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder ``prefix`` in batched requests."""
        keys = self.list(validate_dir_prefix(prefix))
        with self._request() as client:
            errors = list(client.remove_objects(self.bucket, (DeleteObject(k) for k in keys)))
        if errors:
            first = errors[0]
            raise StorageError(
                f"{len(errors)} of {len(keys)} deletions under {prefix!r} failed; "
                f"first: {first.name}: {first.code} {first.message}"
            )
        return len(keys)

    def delete(self, key: str) -> None:
        """Delete the object under ``key``."""
        with self._request(key) as client:
            client.remove_object(self.bucket, key)

    def key_from_link(self, url: str) -> str | None:
        parts = urlsplit(url)
        base_url = self._link_client._base_url  # noqa: SLF001 - the endpoint links are signed for
        if parts.netloc != base_url.host or not parts.path.startswith(f"/{self.bucket}/"):
            return None
        return unquote(parts.path[len(self.bucket) + 2:])

    def link(self, key: str, expires_s: int) -> str:
        """A presigned GET URL valid for ``expires_s`` seconds (1 s to 7 days)."""
        validate_key(key)
        with _s3_errors():
            return self._link_client.presigned_get_object(self.bucket, key, expires=timedelta(seconds=expires_s))

    def check(self) -> None:
        """Reach the server and make sure the bucket exists."""
        self._bucket_ready = False
        self.ensure_bucket()


# --------------------------------------------------------------------------- factory


def store_from_settings(settings: Settings) -> ObjectStore:
    """The store the settings ask for (``DREAMFLOW_STORAGE``)."""
    if settings.storage == "local":
        return LocalStore(settings.resolved_data_dir / "storage", settings.facade_url, settings.signing_secret)
    required = {
        "DREAMFLOW_S3_ENDPOINT": settings.s3_endpoint,
        "DREAMFLOW_S3_ACCESS_KEY": settings.s3_access_key,
        "DREAMFLOW_S3_SECRET_KEY": settings.s3_secret_key,
        "DREAMFLOW_S3_BUCKET": settings.s3_bucket,
    }
    missing = [name for name, value in required.items() if not value]
    if missing:
        raise ValueError(f"DREAMFLOW_STORAGE=s3 needs {', '.join(missing)} to be set")
    return S3Store(
        endpoint=settings.s3_endpoint or "",
        access_key=settings.s3_access_key or "",
        secret_key=settings.s3_secret_key or "",
        bucket=settings.s3_bucket,
        secure=settings.s3_secure,
        region=settings.s3_region,
    )
