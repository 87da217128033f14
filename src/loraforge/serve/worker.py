"""The server's one engine loop, on its own thread: every active request decodes together, whatever its adapter.

HTTP handlers (on the event loop) never touch the model. They hand a `Job` to `EngineWorker.submit`, which answers
`QueueFull` when the bounded queue is full, and they read what the job's `sink` is given:

    ("tokens", [ids...])   new tokens of the request, after each decode step
    ("done", reason)       "stop" or "length"
    ("error", LoraforgeError)

Between two decode steps the loop (1) runs admin calls (`call`: load, replace, unload an adapter), (2) drops the
requests that were cancelled (a client went away, a stop string was met), and (3) lets queued jobs join the batch
while it has room, making their adapters resident first (`AdapterStore.ensure`, pinning the adapters in flight so
they are never evicted under a request). So requests join between steps (continuous batching), and a replaced adapter
never changes a request already decoding: that one keeps the weights it started with.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from loraforge.errors import LoraforgeError
from loraforge.infer.engine import Engine, Request, SamplingParams
from loraforge.infer.session import InferenceSession
from loraforge.infer.store import AdapterStore, StoreFull

log = logging.getLogger("loraforge")


class QueueFull(Exception):
    """The bounded queue is full: answer 429 and let the client retry."""


@dataclass(eq=False)
class Job:
    """One generation: a prompt on an adapter (a store name; None is the base), and where its tokens go."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    sink: Callable[[tuple[str, Any]], None]
    request: Request | None = None  # the engine's, once the job has joined
    cancelled: bool = False
    sent: int = 0  # tokens already given to the sink
    submitted: float = field(default_factory=time.monotonic)


class EngineWorker:
    """Runs `Engine` steps on a thread for jobs submitted from any thread."""

    def __init__(self, session: InferenceSession, store: AdapterStore | None, *, max_batch: int = 16,
                 max_queue: int = 64):
        if max_queue < 1:
            raise LoraforgeError(f"the queue bound must be at least 1, got {max_queue}")
        self.session, self.store = session, store
        self.engine = Engine(session, max_batch=max_batch)
        self.max_queue = max_queue
        self._queue: deque[Job] = deque()  # submitted, not yet in the batch
        self._active: list[Job] = []
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="loraforge-engine", daemon=True)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last steps, for tokens/s
        self.tokens_total = 0

    # ---- any thread ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish nothing more: the loop ends after its current step (the server drains requests before this)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def submit(self, job: Job) -> Job:
        with self._wake:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the server's queue holds {len(self._queue)} requests, its bound; retry shortly")
            self._queue.append(job)
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop `job` at the next step boundary (safe to call at any time, twice, or after it finished)."""
        with self._wake:
            job.cancelled = True
            self._wake.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between two steps; its result (or exception) in the future."""
        future: Future = Future()
        with self._wake:
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    def stats(self) -> dict[str, float]:
        """Queue depth, active requests, generated tokens/s over the last 10 s, resident adapters."""
        with self._wake:
            now = time.monotonic()
            recent = [(t, n) for t, n in self._recent if t > now - 10]
            span = now - recent[0][0] if len(recent) > 1 else 0.0
            rate = sum(n for _, n in recent[1:]) / span if span > 0 else 0.0
            return {"queue_depth": len(self._queue), "active_requests": len(self._active),
                    "tokens_per_second": rate, "tokens_total": self.tokens_total,
                    "resident_adapters": len(self.store.current) if self.store else len(self.session.adapters)}

    # ---- the engine thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._calls or self._queue or self._active):
                    self._wake.wait()
                if self._stopping:
                    break
                calls = list(self._calls)
                self._calls.clear()
            for fn, future in calls:
                self._run_call(fn, future)
            try:
                self._drop_cancelled()
                self._admit()
            except Exception:  # a bug: log it and keep serving (the step below fails its requests if it must)
                log.exception("engine loop")
            if self.engine.has_work:
                self._step()

    def _run_call(self, fn: Callable[[], Any], future: Future) -> None:
        try:
            future.set_result(fn())
        except BaseException as e:  # handed to the caller, who turns it into an HTTP answer
            future.set_exception(e)

    def pinned(self) -> set[str]:
        """Resident names the requests in the batch use (engine thread)."""
        return {job.request.adapter for job in self._active if job.request.adapter is not None}

    def _drop_cancelled(self) -> None:
        with self._wake:
            gone = [job for job in self._queue if job.cancelled]
            for job in gone:
                self._queue.remove(job)
        for job in [j for j in self._active if j.cancelled]:
            self.engine.cancel(job.request)
            self._active.remove(job)
        if self.store:
            self.store.collect(self.pinned())

    def _admit(self) -> None:
        """Queued jobs join while the batch has room; each one's adapter is made resident first."""
        while len(self._active) < self.engine.max_batch:
            with self._wake:
                if not self._queue:
                    return
                job = self._queue.popleft()
            try:
                adapter = job.adapter
                if adapter is not None and self.store is not None:
                    adapter = self.store.ensure([adapter], pinned=self.pinned())[0]
                job.request = self.engine.submit(Request(job.prompt_ids, adapter, job.params))
            except StoreFull:
                with self._wake:
                    self._queue.appendleft(job)  # waits for a request to finish and free its adapter
                return
            except Exception as e:  # a refused adapter (LoraforgeError: 400) or a failure reading it (500)
                if not isinstance(e, LoraforgeError):
                    log.exception("admitting a request failed")
                job.sink(("error", e))
                continue
            self._active.append(job)

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as e:  # a bug, not a user's input: fail the batch's requests, keep the server up
            log.exception("decode step failed")
            for job in self._active:
                job.sink(("error", e))
                self.engine.cancel(job.request)
            self._active.clear()
            return
        produced = 0
        for job in list(self._active):
            ids = job.request.output_ids
            if len(ids) > job.sent:
                produced += len(ids) - job.sent
                job.sink(("tokens", ids[job.sent:]))
                job.sent = len(ids)
            if job.request.done:
                job.sink(("done", job.request.finish_reason))
                self._active.remove(job)
        with self._wake:
            self.tokens_total += produced
            self._recent.append((time.monotonic(), produced))
            while len(self._recent) > 1 and self._recent[0][0] < time.monotonic() - 10:
                self._recent.popleft()
