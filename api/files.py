"""Signed, expiring download links for the local storage backend."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.deps import SettingsDep, StoreDep
from api.errors import ApiError
from flows.store import InvalidKey, ObjectNotFound
from flows.store_local import LocalStore, verify_link

router = APIRouter()


@router.get("/files/{key:path}", include_in_schema=False)
async def download(key: str, expires: int, signature: str, store: StoreDep, settings: SettingsDep) -> FileResponse:
    """Serve one stored object to the holder of a valid, unexpired link."""
    if not isinstance(store, LocalStore) or not verify_link(settings.signing_secret, key, expires, signature):
        raise ApiError(403, "link invalid or expired")
    try:
        path = store.local_path(key)
    except InvalidKey:
        raise ApiError(403, "link invalid or expired") from None
    except ObjectNotFound:
        raise ApiError(404, "file not found") from None
    return FileResponse(path, filename=path.name)
