"""Parallel block decoding: payloads read in order, decoded on worker threads, results taken in order.

zlib (High), the C extension's Fast decoder and its cipher release the GIL while they run (see
``_native.c``), so N threads decode N blocks at once; the caller keeps reading the stream and placing the
decoded bytes strictly in order (positioned writes), so the output and every error are the same as with
one thread. Memory is bounded: at most ``depth`` jobs (one payload in, one block out each, ≤ 64 KiB) are
in flight. ``threads == 1`` runs every job inline (no pool): the one-thread path is the plain loop.

The worker count is ``ghost.decode_threads`` (default: :func:`default_threads`, the CPUs this process
may run on); :func:`pipeline.gho.extract` puts it on the image's walker, where the section readers read it.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: jobs in flight per worker thread (enough to keep every worker busy while the caller places one block)
PER_THREAD = 4
#: items per pool job (blocks of ≤ 64 KiB: a batch holds at most 1 MiB in and 1 MiB out)
BATCH = 16
MAX_THREADS = 256


def default_threads() -> int:
    """The CPUs available to this process (``os.sched_getaffinity``), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _run_batch(fn: Callable[[T], R], batch: list[T]) -> tuple[list[R], BaseException | None]:
    """``fn`` over one batch in a worker: the results up to the first exception, and that exception."""
    out: list[R] = []
    try:
        for item in batch:
            out.append(fn(item))
    except Exception as e:  # noqa: BLE001 - raised by the caller in its turn
        return out, e
    return out, None


def ordered_map(fn: Callable[[T], R], items: Iterable[T], nthreads: int) -> Iterator[R]:
    """``fn(item)`` for every item, in order; with more than one thread, items are taken from ``items``
    ahead in batches of ``BATCH`` (a pool hand-off costs about as much as decoding a small block) and
    run on a pool, at most ``PER_THREAD × threads`` batches in flight.

    ``items`` is consumed by the caller's thread only (reads stay in order). An exception of ``fn`` is
    raised when its result's turn comes; one of ``items`` after every result before it was yielded. So
    what the caller sees, and when, is what the plain loop ``(fn(x) for x in items)`` gives.
    """
    n = max(1, min(MAX_THREADS, nthreads))
    if n <= 1:
        for item in items:
            yield fn(item)
        return
    depth = PER_THREAD * n
    it = iter(items)
    pending: deque[Future[tuple[list[R], BaseException | None]]] = deque()
    failure: BaseException | None = None
    done = False
    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="gho-decode")
    try:
        while True:
            while not done and len(pending) < depth:
                batch: list[T] = []
                try:
                    for _ in range(BATCH):
                        batch.append(next(it))
                except StopIteration:
                    done = True
                except Exception as e:  # noqa: BLE001 - re-raised in order below
                    failure, done = e, True
                if batch:
                    pending.append(pool.submit(_run_batch, fn, batch))
            if not pending:
                break
            results, error = pending.popleft().result()
            yield from results
            if error is not None:
                raise error
        if failure is not None:
            raise failure
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
