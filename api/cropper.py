"""Face crops for ``base64_crop`` in one long-lived helper process.

The facade never imports torch or the worker code: the crop runs in a spawned process that
imports them once and keeps the face detector loaded between requests.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from api.errors import ApiError

CROP_TIMEOUT_S = 120.0


def _crop_in_child(data: bytes, size: int, max_pixels: int) -> bytes | str:
    from tasks.upload_crop import CropFailed, crop_upload  # imported in the crop process only

    try:
        return crop_upload(data, size, max_pixels)
    except CropFailed as exc:
        return str(exc)


def _warm_in_child() -> bool:
    from tasks.upload_crop import warm_up

    return warm_up()


class Cropper:
    """A one-process pool, started on demand and restarted if it dies."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def warm(self) -> None:
        """Start the process and load the detector in the background."""
        self._executor().submit(_warm_in_child)

    async def crop(self, data: bytes, size: int, max_pixels: int) -> bytes:
        """PNG bytes of the square crop; 400 for undecodable images, 503 when the crop process fails."""
        loop = asyncio.get_running_loop()
        try:
            result = await asyncio.wait_for(
                loop.run_in_executor(self._executor(), _crop_in_child, data, size, max_pixels), CROP_TIMEOUT_S
            )
        except (BrokenProcessPool, TimeoutError):
            self.close()
            raise ApiError(503, "the image cropper is unavailable; try again") from None
        if isinstance(result, str):
            raise ApiError(400, f"invalid request: image: {result}", {"image": [result]})
        return result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
