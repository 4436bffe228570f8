"""Request limits shared through the store (graphs.ratelimit) and a teacher answering 429 (evals.fake_teacher).

The limits are checked where they matter, at a real OpenAI-compatible server on loopback: the most requests
it had in flight at once, and the requests that arrived within any window, exactly (no margin): a request
reaches the server at some moment between taking its slot and releasing it, and the limiter counts it in the
window until a window after its release. The window rules themselves are checked with a fake clock, so that
they do not depend on how busy the machine is. Worker processes are forked (each opens its own engine), so
they start in milliseconds instead of re-importing the project.
"""

from __future__ import annotations

import asyncio
import heapq
import multiprocessing
import random
import secrets
import time
from collections.abc import Callable
from multiprocessing.context import ForkProcess
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage
from sqlalchemy import Engine
from sqlmodel import Session, select

from evals.fake_teacher import FakeTeacher
from graphs.models import ModelPool
from graphs.ratelimit import RateLimit, RateLimitedChatModel, StoreRateLimiter
from graphs.runner import add_prospects, run_campaign
from store import open_store
from store.models import RateLimitSlot, Run, RunStatus, Trace
from tests.helpers import small_world
from tests.store_urls import STORE_KINDS, fresh_store_url
from tools import CorpusWeb

LIMIT = RateLimit(max_concurrent=2, max_requests=6, window_s=1.0)


class FakeClock:
    """Seconds since the epoch that only move when a test sets ``t``."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _most_in_any_window(times: list[float], window_s: float) -> int:
    """The most of ``times`` within any ``window_s`` seconds (two count together when less than ``window_s``
    apart): a sliding window over the sorted times."""
    arrivals = sorted(times)
    most, start = 0, 0
    for end, t in enumerate(arrivals):
        while t - arrivals[start] >= window_s:
            start += 1
        most = max(most, end - start + 1)
    return most


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most of the ``(start, end)`` spans open at one moment (an end before a start at the same time)."""
    events = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def _most_a_server_could_see(spans: list[tuple[float, float]], window_s: float) -> int:
    """The most requests a server could count within one ``window_s``, whatever moment of its slot's
    ``(taken, released)`` span each request reached it: the spans ending at or after the one that ends
    first, that start less than ``window_s`` after it ends."""
    return max(sum(1 for s, e in spans if e >= end and s < end + window_s) for _, end in spans)


def _records(teacher: FakeTeacher) -> list[float]:
    return [r.arrived for r in teacher.records]


async def _calls(pool: ModelPool, spec: str, n: int) -> None:
    model = pool.get(spec)
    await asyncio.gather(*(model.ainvoke([HumanMessage(f"say hello {i}")]) for i in range(n)))


def _pool_worker(store_url: str, specs: multiprocessing.Queue, n: int) -> None:
    """One process: ``n`` concurrent calls through the pool's rate-limited model of the spec it is sent."""
    spec = specs.get(timeout=60)
    engine = open_store(store_url, migrate_schema=False)
    asyncio.run(_calls(ModelPool(store=engine, rate_limits={spec: LIMIT}), spec, n))
    engine.dispose()


def _fork_workers(target: Callable[..., None], args: list[tuple[object, ...]]) -> list[ForkProcess]:
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=target, args=a) for a in args]
    for w in workers:
        w.start()
    return workers


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_limits_hold_across_two_processes(kind: str, tmp_path: Path) -> None:
    ModelPool().get("openai:fake@http://127.0.0.1:9/warm/v1")  # the client's imports, once here, not in each worker
    with fresh_store_url(kind, tmp_path, "ratelimit_pool") as store_url:
        open_store(store_url).dispose()  # migrated, and no pooled connection for the workers to inherit
        context = multiprocessing.get_context("fork")
        specs: multiprocessing.Queue = context.Queue()
        # Forked before the teacher's server thread exists; each is sent the teacher's address once it listens.
        workers = _fork_workers(_pool_worker, [(store_url, specs, 9)] * 2)
        teacher = FakeTeacher(latency_s=0.05, answer_unknown="hello")
        with teacher as base_url:
            # A path of its own, so that no HTTP client an earlier test of this process cached for a teacher
            # on the same port (langchain_openai keeps one per base URL) is inherited by the workers.
            unique_url = f"{base_url.removesuffix('/v1')}/{secrets.token_hex(4)}/v1"
            for _ in workers:
                specs.put(f"openai:fake@{unique_url}")
            for w in workers:
                w.join(timeout=120)
        assert [w.exitcode for w in workers] == [0, 0]
        engine = open_store(store_url)
        with Session(engine) as s:
            assert all(slot.released_at is not None for slot in s.exec(select(RateLimitSlot)).all())
        engine.dispose()
    assert len(teacher.records) == 18 and all(r.status == 200 for r in teacher.records)
    assert teacher.max_in_flight <= 2
    assert _most_in_any_window(_records(teacher), LIMIT.window_s) <= 6
    arrivals = sorted(_records(teacher))
    assert arrivals[-1] - arrivals[0] >= 2 * LIMIT.window_s  # 18 requests, 6 per window: 2 windows at least


def _late_sender(store_url: str, n: int, start: Barrier, results: multiprocessing.Queue) -> None:
    """One process: ``n`` requests one after another, each holding a slot of ``LIMIT``; the first is sent
    0.2 s after its slot was taken (a client's first call builds its connection), the others at once.
    Puts the ``(sent, answered)`` times of its requests."""
    engine = open_store(store_url, migrate_schema=False)
    limiter = StoreRateLimiter(engine, "openai:shared", LIMIT, poll_s=0.01)
    spans = []
    start.wait(timeout=60)
    for i in range(n):
        with limiter.slot_sync():
            time.sleep(0.2 if i == 0 else 0.0)
            sent = time.time()
            time.sleep(0.02)  # the request
            spans.append((sent, time.time()))
    results.put(spans)
    engine.dispose()


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_a_late_first_request_does_not_let_two_windows_meet(kind: str, tmp_path: Path) -> None:
    # Counting a request in the window from taking its slot let the next window's requests start while the
    # first ones (sent late) were less than a window old at the server: 7 or 8 of 6 within 1 s.
    with fresh_store_url(kind, tmp_path, "ratelimit_late") as store_url:
        open_store(store_url).dispose()
        context = multiprocessing.get_context("fork")
        start, results = context.Barrier(2), context.Queue()
        workers = _fork_workers(_late_sender, [(store_url, 9, start, results)] * 2)
        spans = [span for _ in workers for span in results.get(timeout=120)]
        for w in workers:
            w.join(timeout=60)
        assert [w.exitcode for w in workers] == [0, 0]
    assert len(spans) == 18
    assert _most_at_once(spans) <= 2
    assert _most_in_any_window([sent for sent, _ in spans], LIMIT.window_s) <= 6


def test_a_request_counts_until_a_window_after_it_ended(engine: Engine) -> None:
    clock = FakeClock()
    t0 = clock.t
    limiter = StoreRateLimiter(engine, "openai:late", RateLimit(max_requests=1, window_s=10.0), clock=clock)
    slot, _ = limiter.try_take()
    assert slot is not None
    clock.t = t0 + 4.0  # the answer came 4 s later: the request reached the server at some moment in between
    limiter.release(slot)
    clock.t = t0 + 10.5  # a window after the slot was taken, not yet after it ended
    refused, wait = limiter.try_take()
    assert refused is None and wait == pytest.approx(3.5, abs=0.002)
    clock.t = t0 + 14.0
    slot, _ = limiter.try_take()
    assert slot is not None


def test_a_full_window_of_requests_in_flight_waits_a_whole_window(engine: Engine) -> None:
    clock = FakeClock()
    limiter = StoreRateLimiter(engine, "openai:x", RateLimit(max_requests=2, window_s=5.0), clock=clock)
    assert all(limiter.try_take()[0] is not None for _ in range(2))
    clock.t += 1.0
    slot, wait = limiter.try_take()  # neither has ended: the earliest either leaves is a window from now
    assert slot is None and wait == pytest.approx(5.0, abs=0.002)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_window_or_moment_holds_too_many_of_many_workers_requests(engine: Engine, seed: int) -> None:
    """Six workers on a fake clock, requests of random length (some longer than the window's share), each
    worker trying again when told: no moment holds more than ``max_concurrent`` of them, no server could count
    more than ``max_requests`` in one window, and every worker gets through."""
    rng, clock = random.Random(seed), FakeClock()
    max_concurrent, max_requests = 3, 5
    limit = RateLimit(max_concurrent=max_concurrent, max_requests=max_requests, window_s=10.0)
    limiter = StoreRateLimiter(engine, f"openai:sim{seed}", limit, clock=clock, poll_s=0.5)
    left = dict.fromkeys(range(6), 6)  # requests each worker still has to make
    # (time, worker, the slot it holds or None: it is about to try)
    events: list[tuple[float, int, int | None]] = [(clock.t + rng.uniform(0, 3), w, None) for w in left]
    heapq.heapify(events)
    taken: dict[int, float] = {}
    spans: list[tuple[float, float]] = []
    while events:
        clock.t, worker, held = heapq.heappop(events)
        if held is not None:
            limiter.release(held)
            spans.append((taken.pop(held), clock.t))
            left[worker] -= 1
            if left[worker]:
                heapq.heappush(events, (clock.t + rng.uniform(0, 2), worker, None))
            continue
        slot, wait = limiter.try_take()
        if slot is None:
            heapq.heappush(events, (clock.t + wait + rng.uniform(0, limiter.poll_s), worker, None))
        else:
            taken[slot] = clock.t
            heapq.heappush(events, (clock.t + rng.choice([0.1, 0.5, 2.0, 7.0]), worker, slot))
    assert len(spans) == 36
    assert _most_at_once(spans) <= max_concurrent
    assert _most_a_server_could_see(spans, limit.window_s) <= max_requests


def test_a_dead_holders_slot_frees_after_its_lease(engine: Engine) -> None:
    clock = FakeClock()
    t0 = clock.t
    limiter = StoreRateLimiter(engine, "openai:x", RateLimit(max_concurrent=1), lease_s=30.0, clock=clock)
    taken, _ = limiter.try_take()  # never released: its holder "died"
    assert taken is not None
    clock.t = t0 + 29.0
    slot, wait = limiter.try_take()
    assert slot is None and wait > 0
    clock.t = t0 + 30.5
    slot, _ = limiter.try_take()
    assert slot is not None


def test_a_dead_holders_request_counts_until_a_window_after_its_lease(engine: Engine) -> None:
    clock = FakeClock()
    t0 = clock.t
    limiter = StoreRateLimiter(engine, "openai:x", RateLimit(max_requests=1, window_s=10.0), lease_s=5.0,
                               clock=clock)
    assert limiter.try_take()[0] is not None  # never released: it may have been sent just before the lease ended
    clock.t = t0 + 6.0
    slot, wait = limiter.try_take()
    assert slot is None and wait == pytest.approx(9.0, abs=0.002)
    clock.t = t0 + 15.0
    assert limiter.try_take()[0] is not None


def test_the_window_says_how_long_to_wait(engine: Engine) -> None:
    clock = FakeClock()
    t0 = clock.t
    limiter = StoreRateLimiter(engine, "openai:x", RateLimit(max_requests=2, window_s=5.0), clock=clock)
    for ended in (0.5, 1.0):
        slot, _ = limiter.try_take()
        assert slot is not None
        clock.t = t0 + ended
        limiter.release(slot)
    clock.t = t0 + 2.0
    slot, wait = limiter.try_take()
    assert slot is None and wait == pytest.approx(3.5, abs=0.002)  # until the first ended a window ago
    clock.t = t0 + 5.5
    assert limiter.try_take()[0] is not None


async def test_limits_hold_within_one_process(sqlite_engine) -> None:
    teacher = FakeTeacher(latency_s=0.05, answer_unknown="hello")
    with teacher as base_url:
        spec = f"openai:fake@{base_url}"
        pool = ModelPool(store=sqlite_engine, rate_limits={spec: RateLimit(max_concurrent=3)})
        assert isinstance(pool.get(spec), RateLimitedChatModel)
        await _calls(pool, spec, 12)
    assert len(teacher.records) == 12
    assert 1 <= teacher.max_in_flight <= 3
    with Session(sqlite_engine) as s:
        assert all(slot.released_at is not None for slot in s.exec(select(RateLimitSlot)).all())


@pytest.mark.parametrize("kwargs", [{"max_concurrent": 0}, {"max_requests": -1}, {"window_s": 0.0}])
def test_bad_limits_are_refused(kwargs) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        RateLimit(**kwargs)


def test_a_teacher_answering_429_is_retried_nothing_lost_or_doubled(tmp_path: Path, sqlite_engine) -> None:
    _, corpus, offer, prospects = small_world(tmp_path, n=3)
    add_prospects(sqlite_engine, "c", offer, prospects)
    teacher = FakeTeacher(latency_s=0.0, too_many_every=2, retry_after_s=0.05)  # every other request: 429
    with teacher as base_url:
        spec = f"openai:fake@{base_url}"
        pool = ModelPool(store=sqlite_engine, rate_limits={spec: RateLimit(max_concurrent=1)})
        report = asyncio.run(run_campaign(sqlite_engine, "c", web=CorpusWeb(corpus), researcher=spec, writer=spec,
                                          concurrency=1, models=pool))
    assert report.done == len(prospects) and report.failed == 0
    statuses = [r.status for r in teacher.records]
    assert statuses.count(429) == statuses.count(200) == 2 * len(prospects)  # each call: one 429, then 200
    with Session(sqlite_engine) as s:
        runs = s.exec(select(Run)).all()
        traces = s.exec(select(Trace)).all()
    assert all(r.status == RunStatus.DONE for r in runs)
    assert sorted((t.run_id, t.agent) for t in traces) == sorted(
        (r.id, agent) for r in runs for agent in ("researcher", "writer"))
