"""Objects as files in a local folder: the embedded default, nothing to start."""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, unquote, urlencode, urlsplit

from flows.store import (
    TMP_PREFIX,
    ObjectNotFound,
    ObjectStore,
    StorageUnavailable,
    atomic_write,
    validate_dir_prefix,
    validate_key,
    validate_prefix,
)


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
        with atomic_write(self._path(key)) as handle:
            handle.write(data)

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        """Copy the file at ``path`` under ``key`` atomically."""
        target = self._path(key)
        with open(path, "rb") as source, atomic_write(target) as handle:
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
        with self._open(key) as source, atomic_write(dest) as handle:
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
                if not name.startswith(TMP_PREFIX) and key.startswith(prefix):
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
