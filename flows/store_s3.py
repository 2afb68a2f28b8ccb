"""Objects in a bucket of an S3-compatible server (MinIO in production) through the ``minio`` SDK."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote, urlsplit

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

from flows.store import (
    ObjectNotFound,
    ObjectStore,
    StorageError,
    StorageUnavailable,
    atomic_write,
    guess_content_type,
    validate_dir_prefix,
    validate_key,
    validate_prefix,
)

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "ResourceNotFound"})
_BUCKET_TAKEN_CODES = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})
# Configuration the server refuses (not a passing outage): wrong keys, a bucket name it rejects.
_REFUSED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidBucketName",
                            "AllAccessDisabled", "InvalidToken", "ExpiredToken"})


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
        if exc.code in _REFUSED_CODES:
            raise StorageUnavailable(
                f"the S3 server refused dreamflow's requests ({exc.code}): check DREAMFLOW_S3_ACCESS_KEY, "
                "DREAMFLOW_S3_SECRET_KEY and DREAMFLOW_S3_BUCKET") from exc
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
            client.fput_object(self.bucket, key, str(path), content_type=content_type or guess_content_type(Path(path)))

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
        with self._download(key) as response, atomic_write(dest) as handle:
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
