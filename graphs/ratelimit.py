"""Request limits per backend that hold across every worker and process sharing one store.

An API teacher limits how many requests may be in flight at once and how many may start per minute, per
account: every worker of a campaign (the coroutines of one process, several ``outreach run`` processes, Ray
actors on many machines) must share one budget. The budget lives in the store the workers already share:
``rate_limit_slots`` holds one row per request taken (when it started, until when it may run, when it was
released) and ``rate_limit_locks`` one row per backend that each taker updates first, which serialises the
takers of one backend (SQLite: an immediate transaction's write lock; PostgreSQL: the row's lock), so that
counting the slots and taking one is a single atomic step. A worker that dies holding a slot frees it when
the slot's lease expires.

When a request counts against ``max_requests``: from taking its slot until ``window_s`` after the slot is
released, not after it was taken. The server counts a request when it arrives, which is some moment between
taking the slot and the answer coming back (the client still builds and sends it, a loaded machine schedules
it late: hundreds of ms for a process's first call); only the release bounds that moment from above. So the
next request of a full window waits until ``window_s`` has passed since an earlier one *ended*, and no
``window_s`` of arrivals at the server ever holds more than ``max_requests`` requests, however late each was
sent (counting from the start would let the first requests of one window, sent late, and the next
window's meet at the server). A slot whose holder died counts until ``window_s`` after its lease expired.
The cost is one request's latency per window (60.2 s instead of 60 s for a 200 ms teacher). Times are
seconds since the epoch from one clock every worker shares (the database's on PostgreSQL, the machine's
wall clock on SQLite); never a monotonic clock, which is per process.

``RateLimitedChatModel`` wraps a backend's chat model so that each ``invoke``/``ainvoke`` (one model call,
including the OpenAI client's own retries of a 429 answer, which honour ``Retry-After``) holds one slot.
A retried request reaches the server again under the same slot, so set the limits at or below the
account's: they are there so that the teacher does not answer 429 at all.
The trace's latency is measured inside the wrapped call, so waiting for a slot does not count as latency.

Sources: the sliding-window log of rate limiting (Kong, "How to Design a Scalable Rate Limiting Algorithm",
2017); OpenAI's rate limits (requests per minute per model, platform.openai.com/docs/guides/rate-limits).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatResult
from langchain_core.runnables import RunnableConfig
from pydantic import ConfigDict
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from store.claims import exclusive_transaction

__all__ = ["RateLimit", "RateLimitedChatModel", "StoreRateLimiter", "limit_key", "parse_rate_limits"]

logger = logging.getLogger(__name__)

#: Longest a backend key may be in the store (``rate_limit_locks.backend``).
MAX_KEY_CHARS = 300


@dataclass(frozen=True)
class RateLimit:
    """The limits of one backend, shared by every worker of every process.

    Args:
        max_concurrent: requests in flight at once at most (None: no limit).
        max_requests: requests started within any ``window_s`` seconds at most (None: no limit).
        window_s: the window of ``max_requests``, seconds (60: requests per minute).

    Raises:
        ValueError: a limit below 1 or a window that is not positive.
    """

    max_concurrent: int | None = None
    max_requests: int | None = None
    window_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_concurrent", "max_requests"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"rate limit {name} must be >= 1 (or unset for no limit), got {value}")
        if not self.window_s > 0:
            raise ValueError(f"rate limit window_s must be > 0 seconds, got {self.window_s}")

    @property
    def unlimited(self) -> bool:
        """True when neither limit is set."""
        return self.max_concurrent is None and self.max_requests is None


class StoreRateLimiter:
    """Takes and releases request slots of one backend in the store, under ``limit``.

    Args:
        engine: the store every worker shares (migrated: ``rate_limit_slots`` and ``rate_limit_locks``).
        backend: the key the limit is shared under (a redacted backend spec), at most 300 characters.
        limit: the limits.
        lease_s: how long a slot may stay taken before it counts as free (its holder died), seconds;
            longer than the slowest model call with its retries.
        poll_s: how long a worker waits before trying again when every concurrent slot is taken, seconds
            (a random jitter of up to the same again is added, so waiting workers do not retry in step).
        clock: seconds since the epoch, the one clock every worker of the store reads (None: the database
            server's ``clock_timestamp()`` on PostgreSQL, ``time.time()`` on SQLite, whose workers share one
            machine). Tests pass a fake clock.

    Raises:
        ValueError: an empty or too long ``backend`` key, or a ``lease_s``/``poll_s`` that is not positive.
    """

    def __init__(self, engine: Engine, backend: str, limit: RateLimit, *, lease_s: float = 300.0,
                 poll_s: float = 0.05, clock: Callable[[], float] | None = None) -> None:
        if not backend or len(backend) > MAX_KEY_CHARS:
            raise ValueError(f"rate limit key must be 1 to {MAX_KEY_CHARS} characters, got {len(backend)}")
        if not lease_s > 0 or not poll_s > 0:
            raise ValueError(f"lease_s and poll_s must be > 0 seconds, got {lease_s} and {poll_s}")
        self.engine, self.backend, self.limit = engine, backend, limit
        self.lease_s, self.poll_s = lease_s, poll_s
        self._clock = clock
        self._db_clock = clock is None and engine.dialect.name == "postgresql"

    def _now(self, conn: Any) -> float:
        """Seconds since the epoch: ``clock`` if one was given, else the database's clock on PostgreSQL
        (workers on many machines agree on it), this machine's wall clock on SQLite (one machine only)."""
        if self._clock is not None:
            return self._clock()
        if self._db_clock:
            return float(conn.execute(text("SELECT extract(epoch from clock_timestamp())")).scalar_one())
        return time.time()

    def try_take(self) -> tuple[int | None, float]:
        """Take a slot if the limits allow it now, in one transaction.

        Returns:
            ``(slot_id, 0.0)`` when a slot was taken, else ``(None, seconds_to_wait)``: when the window is
            full, until enough of its requests have left it (``window_s`` after their release; a whole
            ``window_s`` when one still in flight must leave), else ``poll_s`` (every concurrent slot taken).
        """
        key, limit = self.backend, self.limit
        try:
            # SQLite: BEGIN IMMEDIATE takes the write lock before anything is read (waiting with busy_timeout);
            # PostgreSQL: the first statement takes this backend's row lock. The counts below cannot change
            # until commit.
            with exclusive_transaction(self.engine) as conn:
                locked = conn.execute(text("UPDATE rate_limit_locks SET taken = taken + 1 WHERE backend = :b"),
                                      {"b": key}).rowcount
                if not locked:
                    conn.execute(text("INSERT INTO rate_limit_locks (backend, taken) VALUES (:b, 1)"), {"b": key})
                now = self._now(conn)
                horizon = now - limit.window_s
                # A slot ends when it is released, or when its lease expires (its holder died). One that ended
                # a window ago or more counts for nothing any more.
                conn.execute(text("DELETE FROM rate_limit_slots WHERE backend = :b "
                                  "AND coalesce(released_at, expires_at) <= :h"), {"b": key, "h": horizon})
                wait = 0.0
                if limit.max_concurrent is not None:
                    in_flight = conn.execute(text(
                        "SELECT count(*) FROM rate_limit_slots WHERE backend = :b AND released_at IS NULL "
                        "AND expires_at > :n"), {"b": key, "n": now}).scalar_one()
                    if in_flight >= limit.max_concurrent:
                        wait = self.poll_s
                if limit.max_requests is not None:
                    # Every slot that has not ended, or ended less than a window ago, counts (module docstring).
                    in_window = conn.execute(text(
                        "SELECT count(*) FROM rate_limit_slots WHERE backend = :b "
                        "AND coalesce(released_at, expires_at) > :h"), {"b": key, "h": horizon}).scalar_one()
                    if in_window >= limit.max_requests:
                        # Slots leave the window a window after they ended, in that order; one still in flight
                        # (its lease ends after now) leaves last, at the earliest a window from now.
                        ended = conn.execute(text(
                            "SELECT coalesce(released_at, expires_at) AS ended FROM rate_limit_slots "
                            "WHERE backend = :b AND coalesce(released_at, expires_at) > :h "
                            "ORDER BY ended, id LIMIT 1 OFFSET :k"),
                            {"b": key, "h": horizon, "k": in_window - limit.max_requests}).scalar_one()
                        wait = max(wait, min(ended, now) + limit.window_s - now + 0.001)
                if wait > 0:
                    return None, wait
                slot = conn.execute(text(
                    "INSERT INTO rate_limit_slots (backend, started_at, expires_at) VALUES (:b, :s, :e) RETURNING id"),
                    {"b": key, "s": now, "e": now + self.lease_s}).scalar_one()
                return int(slot), 0.0
        except IntegrityError:  # another worker inserted this backend's lock row first: try again at once
            return None, 0.0

    def release(self, slot: int) -> None:
        """Free a taken slot's concurrency; it still counts against ``max_requests`` for ``window_s`` from now."""
        with self.engine.begin() as conn:
            conn.execute(text("UPDATE rate_limit_slots SET released_at = :n WHERE id = :i"),
                         {"n": self._now(conn), "i": slot})

    def _jittered(self, wait: float) -> float:
        return wait + random.uniform(0, self.poll_s)  # noqa: S311 - jitter, not security

    async def acquire(self) -> int:
        """Wait (without blocking the event loop) until a slot is free, take it and return its id."""
        while True:
            slot, wait = self.try_take()
            if slot is not None:
                return slot
            await asyncio.sleep(self._jittered(wait))

    def acquire_sync(self) -> int:
        """``acquire`` for synchronous callers (blocks the thread while it waits)."""
        while True:
            slot, wait = self.try_take()
            if slot is not None:
                return slot
            time.sleep(self._jittered(wait))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[int]:
        """Hold one slot for the body of an ``async with`` (released however the body ends)."""
        taken = await self.acquire()
        try:
            yield taken
        finally:
            self.release(taken)

    @contextmanager
    def slot_sync(self) -> Iterator[int]:
        """Hold one slot for the body of a ``with`` (released however the body ends)."""
        taken = self.acquire_sync()
        try:
            yield taken
        finally:
            self.release(taken)


class RateLimitedChatModel(BaseChatModel):
    """A chat model whose calls each hold one slot of a ``StoreRateLimiter`` (see the module docstring).

    ``invoke``/``ainvoke`` call the wrapped model's own ``invoke``/``ainvoke`` with the same config and keyword
    arguments (a ``task`` included), so its callbacks, the trace recorder's among them, see the wrapped model;
    ``generate``-style calls go through ``_generate``/``_agenerate`` under the limiter too.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    inner: BaseChatModel
    limiter: StoreRateLimiter

    @property
    def _llm_type(self) -> str:
        return self.inner._llm_type

    @property
    def _identifying_params(self) -> Mapping[str, Any]:
        return {**self.inner._identifying_params, "rate_limit": self.limiter.backend}

    async def ainvoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,  # noqa: A002
                      stop: list[str] | None = None, **kwargs: Any) -> AIMessage:
        async with self.limiter.slot():
            return await self.inner.ainvoke(input, config, stop=stop, **kwargs)

    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,  # noqa: A002
               stop: list[str] | None = None, **kwargs: Any) -> AIMessage:
        with self.limiter.slot_sync():
            return self.inner.invoke(input, config, stop=stop, **kwargs)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        with self.limiter.slot_sync():
            return self.inner._generate(messages, stop=stop, run_manager=run_manager, **kwargs)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        async with self.limiter.slot():
            return await self.inner._agenerate(messages, stop=stop, run_manager=run_manager, **kwargs)


def limit_key(spec: str) -> str:
    """The store key of a backend spec's limit: the spec with credentials masked, at most 300 characters."""
    from miniatures.redaction import redact

    return redact(spec)[:MAX_KEY_CHARS]


def parse_rate_limits(items: Sequence[tuple[str, int | None, int | None]]) -> dict[str, RateLimit]:
    """``{spec: RateLimit}`` from ``(spec, max_concurrent, requests_per_minute)`` triples (the settings'
    ``[rate_limits."<spec>"]`` tables), leaving out entries without any limit. Raises ``ValueError``."""
    limits = {spec: RateLimit(max_concurrent=c, max_requests=r) for spec, c, r in items}
    return {spec: limit for spec, limit in limits.items() if not limit.unlimited}
