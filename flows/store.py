"""Artifact storage: one interface, two backends (a local directory in :mod:`flows.store_local`,
S3 through ``minio`` in :mod:`flows.store_s3`).

Keys are relative, '/'-separated paths such as ``trainings/<id>/exports/lora.safetensors``.
These modules are imported by the API facade, so they use only the standard library, ``minio``
and ``urllib3``.
"""

from __future__ import annotations

import abc
import mimetypes
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from flows.settings import Settings

MAX_KEY_LENGTH = 512
TMP_PREFIX = ".dreamflow-tmp-"


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
        if segment.startswith(TMP_PREFIX):
            raise InvalidKey(f"object key segment uses the reserved prefix {TMP_PREFIX!r}: {key!r}")
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


def guess_content_type(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


@contextmanager
def atomic_write(dest: Path) -> Iterator[BinaryIO]:
    """A temp file next to ``dest`` (parents created) that replaces it only once fully written."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise StorageError(f"{dest} lies below an existing file") from exc
    except OSError as exc:
        raise write_failed(dest, exc) from exc
    tmp = dest.with_name(f"{TMP_PREFIX}{secrets.token_hex(8)}-{dest.name}")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, dest)
    except IsADirectoryError as exc:
        raise StorageError(f"{dest} is an existing folder") from exc
    except OSError as exc:  # a full disk, a read-only or protected file: the store's failure, said in words
        raise write_failed(dest, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_failed(dest: Path, exc: OSError) -> StorageError:
    """A local write that failed, without the server's paths (the message may reach a client)."""
    return StorageError(f"the store could not write {dest.name}: {(exc.strerror or str(exc)).lower()}")


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



# --------------------------------------------------------------------------- factory


def store_from_settings(settings: Settings) -> ObjectStore:
    """The store the settings ask for (``DREAMFLOW_STORAGE``)."""
    from flows.store_local import LocalStore
    from flows.store_s3 import S3Store

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
        public_endpoint=settings.s3_public_endpoint,
    )
