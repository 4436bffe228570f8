"""Run a finetune job (a base bootstrap) in a child process beside other work, and move CPU threads to it
while it runs.

``outreach demo --distill`` pretrains its base beside the single-threaded teacher campaign and gives it every core
once the campaign is done. A job runs in a fresh interpreter (``multiprocessing``'s ``spawn``: no forked torch
thread pools or open SQLite connections; the calling script needs the usual ``if __name__ == "__main__"`` guard),
reads the torch intra-op thread count it should use from a shared integer before each step
(``finetune.base.bootstrap_base`` takes ``num_threads``), and sends its progress and its result (or exception)
back through a queue. Changing the count mid-run keeps the bootstrap's numbers bitwise the same
(``tests/test_finetune_background.py``); padded training batches are not thread-invariant, so other jobs should
keep one count unless checked the same way.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["BackgroundJob", "BackgroundJobError", "bootstrap_job", "set_threads"]

logger = logging.getLogger(__name__)


class BackgroundJobError(RuntimeError):
    """A background job's exception could not be sent back as itself; the message holds its traceback."""


def set_threads(n: int) -> None:
    """Set torch's intra-op threads of the calling process to ``n`` (>= 1) when it differs from the current count."""
    import torch

    n = max(1, int(n))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _child(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], threads: Any, events: Any) -> None:
    """The child process: run ``fn(*args, on_progress=..., num_threads=..., **kwargs)``, send what happened."""
    set_threads(threads.value)
    try:
        result = fn(*args, on_progress=lambda update: events.put(("progress", update)),
                    num_threads=lambda: threads.value, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent, which raises it
        text = traceback.format_exc()
        try:
            events.put(("error", exc, text))
        except Exception:  # noqa: BLE001 - an unpicklable exception: send its text
            events.put(("error", None, text))
        return
    events.put(("result", result))


class BackgroundJob:
    """A function run in a child process, with a thread budget the parent can change while it runs.

    Args:
        fn: a module-level function (it is pickled by reference) that accepts ``on_progress`` (called with each
            progress update) and ``num_threads`` (returns the torch threads to use now) keyword arguments, as
            ``bootstrap_job`` does. Its arguments, updates and result must be picklable.
        *args, **kwargs: passed to ``fn``.
        threads: torch intra-op threads the child starts with (>= 1).

    Example::

        job = BackgroundJob(bootstrap_job, "corpus.sqlite", "models/base", threads=1, preset="2m")
        ...  # other work on the remaining cores
        job.set_threads(2)  # the other work is done
        info = job.result()
    """

    def __init__(self, fn: Callable[..., Any], /, *args: Any, threads: int = 1, **kwargs: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._threads = ctx.Value("i", max(1, int(threads)))
        self._events = ctx.Queue()
        self._done = False
        self._pending: list[Any] = []
        self._outcome: tuple[Any, ...] | None = None
        self._process = ctx.Process(target=_child, args=(fn, args, kwargs, self._threads, self._events),
                                    name=f"background-{getattr(fn, '__name__', 'job')}", daemon=True)
        self._process.start()
        logger.info("started %s in process %s with %d thread(s)", self._process.name, self._process.pid, threads)

    @property
    def threads(self) -> int:
        """The torch threads the child uses from its next step on."""
        return int(self._threads.value)

    def set_threads(self, n: int) -> None:
        """Ask the child to use ``n`` (>= 1) torch threads from its next optimizer step on."""
        self._threads.value = max(1, int(n))

    def _take(self, block: bool, timeout: float | None = None) -> list[Any]:
        """Receive what the child sent (waiting up to ``timeout`` for the first message when ``block``); return
        the progress updates not handed out yet."""
        while not self._done:
            try:
                event = self._events.get(block=block, timeout=timeout)
            except queue.Empty:
                break
            if event[0] == "progress":
                self._pending.append(event[1])
            else:
                self._outcome, self._done = event, True
            block = False
        updates, self._pending = self._pending, []
        return updates

    def updates(self) -> list[Any]:
        """The progress updates sent since the last call (never blocks)."""
        return self._take(block=False)

    def running(self) -> bool:
        """Whether the job has not finished yet (its result or error not received)."""
        self._pending = self._take(block=False)  # kept for updates()
        if not self._done and not self._process.is_alive():
            self._pending = self._take(block=True, timeout=1.0)  # the last message may still be in the pipe
            if not self._done:
                self._outcome, self._done = ("error", None, f"the process exited with code {self._process.exitcode} "
                                             "without a result"), True
        return not self._done

    def result(self, on_update: Callable[[Any], None] | None = None) -> Any:
        """Wait for the job; hand each progress update still to come to ``on_update``; return ``fn``'s result.

        Raises:
            The child's exception (re-raised in this process), or ``BackgroundJobError`` with its traceback
            when it could not be pickled or the process died without a result.
        """
        while True:
            running = self.running()
            for update in self._take(block=running, timeout=0.5):
                if on_update is not None:
                    on_update(update)
            if not running:
                break
        self._process.join(timeout=30)
        assert self._outcome is not None
        if self._outcome[0] == "result":
            return self._outcome[1]
        _, exc, text = self._outcome
        if isinstance(exc, BaseException):
            raise exc
        raise BackgroundJobError(f"{self._process.name} failed:\n{text}")

    def stop(self) -> None:
        """End the child process now (its work is lost)."""
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=10)
        self._done = True


def bootstrap_job(corpus_path: str, out_dir: str, *, on_progress: Callable[[Any], None],
                  num_threads: Callable[[], int], **kwargs: Any) -> Any:
    """``finetune.base.bootstrap_base`` on the texts of the corpus at ``corpus_path``, for ``BackgroundJob``;
    returns its ``BaseModelInfo`` (``on_progress`` is unused: the bootstrap reports no steps)."""
    from pathlib import Path

    from finetune.base import bootstrap_base, corpus_texts

    del on_progress
    return bootstrap_base(Path(out_dir), list(corpus_texts(corpus_path)), num_threads=num_threads, **kwargs)
