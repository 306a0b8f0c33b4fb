"""A bounded request queue and the one worker thread that decodes everything in batches.

Requests waiting together are prefilled as one left-padded batch; with continuous batching
(the default where the engine's cache allows it) new requests also join a running batch between
two decoding steps instead of waiting for it to finish. Each step the worker checks every row:
stop token, stop string, max_tokens, a cancelled request (the client went away). Finished rows
leave the batch at once, so their slot serves the next request.

Events go back to the request through `Job.emit` (called from the worker thread):
    ("delta", index, text, [Pick]) ; ("done", index, finish_reason, n_tokens) ; ("error", message)
"""

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from tunelab.generation import SamplingConfig
from tunelab.serving.engines import Row

log = logging.getLogger("tunelab.serve")


class QueueFull(Exception):
    pass


@dataclass
class Job:
    """One request: n choices of the same prompt."""

    prompt: list[int]
    samplings: list[SamplingConfig]
    """One per choice (they differ in seed)."""
    emit: Callable[[tuple], None]
    adapter: str | None = None
    stops: list[str] = field(default_factory=list)
    top_logprobs: int = -1
    first_index: int = 0
    """Index of this job's first choice in the response (a completions request may hold several prompts)."""
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def n(self) -> int:
        return len(self.samplings)


@dataclass
class _Slot:
    """Batcher-side state of a row: what text has gone out, and where it stands."""

    job: Job
    index: int
    sent: int = 0  # characters of decoded text already emitted


class Batcher:
    """Feeds queued jobs to the engine in batches of up to `max_batch` rows."""

    def __init__(self, engine, max_batch: int = 16, max_queue: int = 64, continuous: bool = True):
        self.engine, self.max_batch, self.max_queue, self.continuous = engine, max(1, max_batch), max_queue, continuous
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.active_rows = 0
        self.peak_rows = 0  # most rows ever decoded together (tests and /health show batching works)
        self.steps = 0
        self.tokens = 0  # tokens sampled since start

    # ---- called from the server --------------------------------------------------------
    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all or none); QueueFull when the queue holds max_queue jobs already."""
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self._queue.extend(jobs)
            self._cv.notify()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tunelab-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking work, cancel what is left, and join the worker."""
        with self._cv:
            self._stopping = True
            for job in self._queue:
                job.emit(("error", "the server is shutting down"))
            self._queue.clear()
            self._cv.notify_all()
        if self._thread:
            self._thread.join(timeout)

    # ---- the worker ----------------------------------------------------------------------
    def _take(self, room: int, block: bool) -> list[Job]:
        """Jobs to start now: up to `room` rows (at least one job when the batch is empty)."""
        with self._cv:
            while block and not self._queue and not self._stopping:
                self._cv.wait()
            taken, rows = [], 0
            while self._queue:
                job = self._queue[0]
                if job.cancelled.is_set():
                    self._queue.popleft()
                    continue
                if rows + job.n > room and (taken or not block):
                    break
                taken.append(self._queue.popleft())
                rows += job.n
            return taken

    def _run(self) -> None:
        batch, slots = None, []
        while not self._stopping:
            try:
                if batch is None or not len(batch):
                    batch, slots = self.engine.open_batch(), []
                    new = self._take(self.max_batch, block=True)
                elif self.continuous and batch.can_join() and len(batch) < self.max_batch:
                    new = self._take(self.max_batch - len(batch), block=False)
                else:
                    new = []
                if new:
                    rows, new_slots = [], []
                    for job in new:
                        for i, s in enumerate(job.samplings):
                            rows.append(Row(job.prompt, s, job.adapter, job.top_logprobs))
                            new_slots.append(_Slot(job, job.first_index + i))
                    batch.add(rows)
                    slots += new_slots
                if not len(batch):
                    continue
                self._step(batch, slots)
                self.active_rows = len(batch)
            except Exception as e:  # never let one bad batch kill the worker
                log.exception("generation failed")
                for job in {id(s.job): s.job for s in slots}.values():
                    job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
                batch, slots = None, []
                self.active_rows = 0
        for job in {id(s.job): s.job for s in slots}.values():
            job.emit(("error", "the server is shutting down"))

    def _step(self, batch, slots: list[_Slot]) -> None:
        picks = batch.sample()
        self.peak_rows = max(self.peak_rows, len(picks))
        self.tokens += len(picks)
        keep, tokens = [], []
        e = self.engine
        for i, (row, slot, pick) in enumerate(zip(batch.rows, slots, picks)):
            job = slot.job
            if job.cancelled.is_set():
                continue
            finish = None
            if pick.token in e.stop_ids:
                finish = "stop"
            else:
                row.generated.append(pick.token)
            text = e.decode(row.generated)
            cut = _find_stop(text, job.stops, slot.sent)
            if cut is not None:
                text, finish = text[:cut], "stop"
            elif finish is None and (len(row.generated) >= row.sampling.max_new_tokens
                                     or len(row.prompt) + len(row.generated) >= e.context_length):
                finish = "length"
            end = len(text) if finish else _safe_end(text, job.stops)
            lp = [pick] if pick.logprob is not None and pick.token not in e.stop_ids else []
            if end > slot.sent or lp:
                job.emit(("delta", slot.index, text[slot.sent:end], lp))
                slot.sent = max(slot.sent, end)
            if finish:
                job.emit(("done", slot.index, finish, len(row.generated)))
            else:
                keep.append(i)
                tokens.append(pick.token)
        batch.keep(keep)
        slots[:] = [slots[i] for i in keep]
        if keep:
            batch.advance(tokens)
        self.steps += 1


def _find_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Where the first stop string starts in text, looking only where it could newly appear."""
    best = None
    for s in stops:
        k = text.find(s, max(0, sent - len(s)))
        if k >= 0 and (best is None or k < best):
            best = k
    return best


def _safe_end(text: str, stops: list[str]) -> int:
    """How much text can go out now: hold back a half-decoded character and any tail that may
    still grow into a stop string."""
    base = len(text)
    while base and text[base - 1] == "\ufffd":
        base -= 1
    end, head = base, text[:base]
    for s in stops:
        for k in range(min(len(s) - 1, base), 0, -1):
            if head.endswith(s[:k]):
                end = min(end, base - k)
                break
    return end
