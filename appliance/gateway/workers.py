"""A small, bounded pool of worker processes for DICOM conversion, kept off the event loop and out of its process.

Processes, not threads: GDCM holds the interpreter lock while it decodes (a panoramic's JPEG-LS frame stalled a
thread-pool gateway's event loop for its whole 100+ ms decode), and a codec is C code fed bytes from the network:
if a crafted file crashes it, a worker dies, not the gateway with every stream it carries. Bytes go to the worker
and the PNG comes back through a pipe; nothing is written to disk.

At most ``workers`` conversions run at once; the rest wait in the executor's queue, whose length admission bounds
(``max_inflight`` requests of at most ``max_images`` images each). Workers start with the first DICOM request
(``forkserver``: a clean process, never a fork of the event loop's threads) and preload the codecs once.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from appliance.gateway.dicom import DicomError, DicomImage, convert_dicom

__all__ = ["ConversionPool", "default_workers"]


def default_workers() -> int:
    """Half the CPUs, 1 to 4: conversions must leave cores to the event loop and to vLLM's own image processing."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _start_worker() -> None:
    """Run once in each new worker (the import of :mod:`dicom`, pydicom, GDCM and numpy, came with the fork)."""
    # pydicom warns about odd values by quoting them; a worker's standard error is the gateway's log.
    warnings.simplefilter("ignore")
    # A conversion can wait a few milliseconds; a stream's next chunk should not: the event loop wins the CPU. The
    # installed unit's system-call filter (~@resources) refuses setpriority: then the worker runs at normal priority.
    with contextlib.suppress(OSError):
        os.nice(10)


def _ready() -> None:
    """A no-op task: running it proves a worker is up."""


class ConversionPool:
    """Converts DICOM files (base64) to PNG in worker processes; replaces itself when a worker dies."""

    def __init__(self, workers: int, convert: Callable[[bytes, int], DicomImage] = convert_dicom) -> None:
        self.workers = workers
        self._convert = convert  # a module-level function (it is pickled by name to the workers)
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["appliance.gateway.dicom"])
            self._executor = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_start_worker)
        return self._executor

    async def warm(self) -> None:
        """Start the workers now rather than on the first DICOM (the first start imports the codecs: ~1 s)."""
        loop = asyncio.get_running_loop()
        pool = self._pool()
        await asyncio.gather(*(loop.run_in_executor(pool, _ready) for _ in range(self.workers)))

    async def convert(self, b64: bytes, max_pixels: int) -> DicomImage:
        """The converted image; raises :class:`DicomError` (the client's 400) when the file is refused or kills
        the worker that decodes it."""
        pool = self._pool()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, self._convert, b64, max_pixels)
        except BrokenProcessPool:
            if self._executor is pool:  # the first request to see it replaces the pool; the others just fail
                self._executor = None
                pool.shutdown(wait=False, cancel_futures=True)
            raise DicomError(
                "the image decoder failed on it (the file is damaged or crafted); send it as the imaging system "
                "stored it, or as PNG"
            ) from None

    def close(self) -> None:
        """Stop the workers (queued conversions are cancelled)."""
        pool, self._executor = self._executor, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
