"""The local executor: prefetch (decode + resize in threads) -> the model (one pass per
batch) -> the writer (render + atomic writes in a background thread, the JSON last).

The model thread never waits on disk: decoding of batch n+1 runs while batch n is on
the model, and rendering/writing of batch n runs while batch n+1 is. A record is
reported (`emit`) only once its files are written, in input order.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from camcli.errors import OutputError
from camcli.io import InputItem
from camcli.run.plan import Prepared
from camcli.run.reporting import Reporter, RunSummary
from camcli.run.stages import (
    Decoded,
    Outcome,
    build_record,
    decode,
    explain_batch,
    prior_for,
    remove_stale,
    write_outputs,
)

# A batch read from a stream (paths on stdin) starts once it is full or this long after
# its first path arrived, so a slow producer's first image is explained at once.
STREAM_WAIT_S = 0.25


class LocalRun:
    """One `camcli explain` over a list (or a stream) of inputs, in this process."""

    def __init__(self, prepared: Prepared, stream_wait: float = STREAM_WAIT_S) -> None:
        self.prepared = prepared
        self.stream_wait = stream_wait
        self._writes_pending = threading.BoundedSemaphore(4 * prepared.config.batch_size)

    def is_finished(self, item: InputItem) -> bool:
        """Whether an earlier run already explained `item` the same way (it would be skipped)."""
        prior = prior_for(self.prepared, item)
        return prior is not None and prior.finished

    def run(self, items: Iterable[InputItem], reporter: Reporter) -> RunSummary:
        """Explain `items` (a list, or an iterator such as paths read from stdin: work
        starts with the first).

        A first Ctrl-C stops the run after the batch on the model: writes already queued
        finish, nothing is left half-written, and the summary says ``interrupted``. A full
        disk stops it too (``disk_full``): the files of that image are not left, and the same
        command resumes once there is room.
        """
        summary = RunSummary()
        config = self.prepared.config
        pending: deque[tuple[Outcome | None, Future[dict[str, Any]]]] = deque()
        lock = threading.Lock()  # the writer's callbacks and this thread both report

        def report() -> None:
            with lock:
                self._report_written(pending, summary, reporter)

        def written(_: Future[dict[str, Any]]) -> None:
            self._writes_pending.release()
            report()  # in the writer thread: a record is out as soon as its files are

        with (
            stop_on_sigint() as stop,
            ThreadPoolExecutor(config.workers, thread_name_prefix="camcli-decode") as decoder,
            ThreadPoolExecutor(1, thread_name_prefix="camcli-write") as writer,
            self.prepared.explainer.session(),
        ):
            for batch in self._batches(items, decoder, stop):
                if stop.is_set() or summary.disk_full:
                    summary.interrupted = stop.is_set()
                    decoder.shutdown(wait=False, cancel_futures=True)
                    break
                decoded = [entry for entry in batch if isinstance(entry, Decoded)]
                outcomes = iter(explain_batch(self.prepared, decoded))
                for entry in batch:
                    if isinstance(entry, dict):  # finished by an earlier run: reported as it is
                        done: Future[dict[str, Any]] = Future()
                        done.set_result(entry)
                        with lock:
                            pending.append((None, done))
                        continue
                    outcome = next(outcomes)
                    self._writes_pending.acquire()  # bounds memory: at most 4 batches queued
                    job = writer.submit(write_outputs, self.prepared, outcome, build_record(self.prepared, outcome))
                    with lock:  # a write done before this is reported by the report() below
                        pending.append((outcome, job))
                    job.add_done_callback(written)
                report()
            summary.interrupted = stop.is_set()  # also during the last batch: it finished, the user still asked
        report()  # the writer has finished: everything left
        return summary

    def _batches(
        self, items: Iterable[InputItem], decoder: ThreadPoolExecutor, stop: threading.Event
    ) -> Iterator[list[Any]]:
        """Batches of decoded inputs (or earlier records), decoding one batch ahead when the
        next inputs are at hand; a stream never waits for paths while a batch is ready."""
        chunks = _Chunks(items, self.prepared.config.batch_size, self.stream_wait, stop)
        waiting: list[Any] | None = None
        exhausted = False
        while not exhausted or waiting is not None:
            chunk = None if exhausted else chunks.take(block=waiting is None)
            exhausted = exhausted or chunk is _END
            submitted = None
            if isinstance(chunk, list):
                remove_stale(self.prepared, chunk)
                submitted = [self._plan(item, decoder) for item in chunk]
            if waiting is not None:
                yield [entry.result() if isinstance(entry, Future) else entry for entry in waiting]
            waiting = submitted

    def _plan(self, item: InputItem, decoder: ThreadPoolExecutor) -> dict[str, Any] | Future[Decoded]:
        """An earlier run's record if it has every requested method, else the decode job."""
        prior = prior_for(self.prepared, item)
        if prior is not None and prior.finished:
            assert prior.record is not None
            return prior.record
        config = self.prepared.config
        return decoder.submit(decode, item, self.prepared.loaded.input, config.max_pixels, prior)

    def _report_written(
        self,
        pending: deque[tuple[Outcome | None, Future[dict[str, Any]]]],
        summary: RunSummary,
        reporter: Reporter,
    ) -> None:
        """Report every finished write at the head of the queue, in input order."""
        while pending and pending[0][1].done():
            outcome, future = pending.popleft()
            error = future.exception()
            if outcome is None:  # an earlier run's record
                summary.skipped += 1
                reporter.emit(future.result())
                reporter.advance(1)
            elif error is None:
                failed = None if outcome.error is None else f"{outcome.item.path}: {outcome.error}"
                summary.ended(reporter, future.result(), failed)
            else:  # its files are not there: an error record, never done (a full disk said once)
                message = _write_error(outcome, error, summary)
                summary.failed += 1
                if message is not None:
                    summary.errors.append(message)
                    reporter.report_error(message)
                reporter.emit(build_record(self.prepared, Outcome(outcome.item, None, str(error))))
                reporter.advance(1)


def _write_error(outcome: Outcome, error: BaseException, summary: RunSummary) -> str | None:
    """The line a failed write reports (a full disk said once: every later write finds it too)."""
    if isinstance(error, OutputError) and error.disk_full:
        if summary.disk_full is not None:
            return None
        summary.disk_full = f"{outcome.item.path}: {error}"
        return summary.disk_full
    if isinstance(error, OutputError):
        return f"{outcome.item.path}: {error}"
    return f"{outcome.item.path}: cannot write outputs: {error}"


_END = object()  # `_Chunks.take`: the inputs are exhausted


class _Chunks:
    """Batches of inputs as they become available. A list is cut into batches; any other
    iterable (paths on stdin) is read by a thread, and a batch is handed out once full or
    `wait` seconds after its first input arrived."""

    def __init__(self, items: Iterable[InputItem], size: int, wait: float, stop: threading.Event) -> None:
        self.size, self.wait, self.stop = size, wait, stop
        self._list = list(items) if isinstance(items, Sequence) else None
        self._at = 0
        self._queue: queue.Queue[Any] = queue.Queue()
        if self._list is None:
            threading.Thread(target=self._pump, args=(items,), daemon=True, name="camcli-inputs").start()

    def _pump(self, items: Iterable[InputItem]) -> None:
        try:
            for item in items:
                self._queue.put(item)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the run's thread
            self._queue.put(exc)
        self._queue.put(_END)

    def take(self, block: bool) -> list[InputItem] | object | None:
        """The next batch, `_END`, or None when `block` is False and nothing has arrived."""
        if self._list is not None:
            chunk = self._list[self._at : self._at + self.size]
            self._at += self.size
            return chunk or _END
        first = self._get(None if block else 0.0)
        if first is None or first is _END:
            return first
        chunk = [first]
        deadline = time.monotonic() + self.wait
        while len(chunk) < self.size:
            item = self._get(max(0.0, deadline - time.monotonic()))
            if item is None:
                break
            if item is _END:
                self._queue.put(_END)  # seen again by the next take
                break
            chunk.append(item)
        return chunk

    def _get(self, timeout: float | None) -> Any:
        """One queued entry; None after `timeout` (None: until one comes or Ctrl-C)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = 0.1 if end is None else min(0.1, end - time.monotonic())
            try:
                entry = self._queue.get(timeout=max(remaining, 0.0)) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                if self.stop.is_set() or (end is not None and time.monotonic() >= end):
                    return _END if self.stop.is_set() else None
                continue
            if isinstance(entry, BaseException):
                raise entry
            return entry


@contextmanager
def stop_on_sigint() -> Iterator[threading.Event]:
    """An event set by the first SIGINT (a second one interrupts at once, as usual).

    Only the main thread can install signal handlers; elsewhere (and where SIGINT is
    ignored, as under nohup) Ctrl-C keeps its meaning.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) in (
        signal.SIG_IGN,
        None,  # a handler set outside Python: leave it alone
    ):
        yield stop
        return

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
