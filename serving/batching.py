"""One worker thread owns the model; requests wait in a queue for it and run in batches.

Requests that decode alike (same prompt, same kind of timestamps) share one pipeline call, so concurrent clients
fill a batch instead of waiting for each other one by one. The shortest waiting request goes first, so a long file
does not hold up short clips queued behind it, unless a request has waited longer than ``patience`` seconds: then
the oldest goes first, so none waits for ever. Nothing is dropped: every job gets its result or its error. A job whose client has gone is taken out of the queue, and a batch whose clients have all gone stops
generating at the next token.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import StoppingCriteria


@dataclass(frozen=True)
class DecodeOptions:
    """What must be equal for two requests to share a pipeline call."""

    prompt: str | None = None
    task: str | None = None  # the pipeline's task (its instruction and its decoding defaults)
    word_timestamps: bool = False


@dataclass(eq=False)
class Job:
    audio: np.ndarray  # mono float32 at the model's sampling rate
    options: DecodeOptions
    queued_at: float = field(default_factory=time.monotonic)
    result: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)


class JobCancelled(Exception):
    """The job's client went away before it ran."""


class AllCancelled(StoppingCriteria):
    """Stops a batch's generation once every job in it has been cancelled: no one is waiting for the text."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        stop = all(job.cancelled.is_set() for job in self.jobs)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class BatchQueue:
    """A queue of jobs served by one worker thread in batches of up to ``max_batch``.

    ``run_batch`` takes jobs of equal options and returns one pipeline result per job, in order. A batch starts
    with the shortest job, or the oldest once it has waited ``patience`` seconds, and takes the next jobs with
    its options in arrival order.
    """

    def __init__(
        self, run_batch: Callable[[list[Job]], list[dict[str, Any]]], max_batch: int, patience: float
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.patience = patience
        self.completed = 0
        self.cancelled = 0
        self._jobs: deque[Job] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self._worker: threading.Thread | None = None

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="tiny-audio-batches", daemon=True)
        self._worker.start()

    def close(self) -> None:
        """Finishes the batch that is running; jobs still queued fail with JobCancelled."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._worker is not None:
            self._worker.join()
        while self._jobs:
            self._jobs.popleft().result.set_exception(JobCancelled("the server is shutting down"))

    def submit(self, audio: np.ndarray, options: DecodeOptions) -> Job:
        job = Job(audio, options)
        with self._changed:
            if self._closed:
                raise JobCancelled("the server is shutting down")
            self._jobs.append(job)
            self._changed.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client has gone: drop the job if it is still queued, or let its batch stop early."""
        job.cancelled.set()
        with self._changed:
            if job in self._jobs:
                self._jobs.remove(job)
                job.result.set_exception(JobCancelled("the client disconnected"))
            self.cancelled += 1

    @property
    def queued(self) -> int:
        return len(self._jobs)

    def _next_batch(self) -> list[Job] | None:
        with self._changed:
            while not self._jobs and not self._closed:
                self._changed.wait()
            if self._closed:
                return None
            oldest = self._jobs[0]
            if time.monotonic() - oldest.queued_at >= self.patience:
                first = oldest
            else:
                first = min(self._jobs, key=lambda job: job.audio.size)  # the earliest of equally short ones
            others = [job for job in self._jobs if job is not first and job.options == first.options]
            batch = [first, *others[: self.max_batch - 1]]
            for job in batch:
                self._jobs.remove(job)
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                results = self.run_batch(batch)
            except Exception as error:  # noqa: BLE001 - every waiting client gets the error, the worker goes on
                for job in batch:
                    job.result.set_exception(error)
                continue
            for job, result in zip(batch, results, strict=True):
                job.result.set_result(result)
            self.completed += len(batch)
