"""The per-worker watchdog (serve/gateway/watchdog.py): which requests get a task watching for their
client to leave, and which are cancelled for a silent upstream, driven with an explicit clock."""

from __future__ import annotations

import asyncio
from typing import Any

from serve.gateway.proxy import Call
from serve.gateway.routes import ROUTES
from serve.gateway.watchdog import Watchdog

READ_TIMEOUT_S, WATCH_AFTER_S = 10.0, 0.05


def _call(start: float) -> Call:
    return Call("rid", ROUTES[0], start, 0.0)


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.sleep(3600)
    return {"type": "http.disconnect"}


async def _scenario(body: Any) -> Any:
    """Run ``body(watchdog, task_of)`` in a loop; ``task_of()`` makes a request task that only sleeps."""
    tasks: list[asyncio.Task[None]] = []

    def task_of() -> asyncio.Task[None]:
        tasks.append(asyncio.ensure_future(asyncio.sleep(3600)))
        return tasks[-1]

    try:
        return await body(Watchdog(READ_TIMEOUT_S, WATCH_AFTER_S), task_of)
    finally:
        for task in tasks:
            task.cancel()


def test_only_requests_still_running_after_watch_after_s_get_a_watcher_and_release_stops_it():
    async def body(watchdog: Watchdog, task_of: Any) -> None:
        short, long = _call(0.0), _call(0.0)
        watchdog.add(short, _never_disconnects, task_of())
        watchdog.add(long, _never_disconnects, task_of())
        long.start = short.start = 100.0
        watchdog.sweep(100.0 + WATCH_AFTER_S / 2)  # not due yet
        assert short.watcher is None and long.watcher is None
        watchdog.release(short)  # answered before it was due: never watched
        watchdog.sweep(100.0 + WATCH_AFTER_S)
        assert short.watcher is None
        assert long.watcher is not None and watchdog.watching == 1
        watchdog.release(long)
        await asyncio.sleep(0)
        assert long.watcher.cancelled()
        watchdog.sweep(101.0)
        assert watchdog.watching == 0

    asyncio.run(_scenario(body))


def test_a_request_whose_upstream_is_silent_for_the_read_timeout_is_cancelled_as_timed_out():
    async def body(watchdog: Watchdog, task_of: Any) -> None:
        silent, talking, finishing = _call(0.0), _call(0.0), _call(0.0)
        tasks = {}
        for call in (silent, talking, finishing):
            tasks[id(call)] = task = task_of()
            watchdog.add(call, _never_disconnects, task)
            call.start = call.upstream_at = 100.0
        watchdog.sweep(100.0 + WATCH_AFTER_S)  # all three watched now
        talking.upstream_at = 100.0 + READ_TIMEOUT_S / 2  # a streamed piece came in
        finishing.finished = True  # its last bytes are being sent: not cancelled now
        watchdog.sweep(100.0 + READ_TIMEOUT_S - 0.01)
        assert not any(call.timed_out for call in (silent, talking, finishing))
        watchdog.sweep(100.0 + READ_TIMEOUT_S)
        await asyncio.sleep(0)
        assert silent.timed_out and tasks[id(silent)].cancelled()
        assert not talking.timed_out and not tasks[id(talking)].done()
        assert not finishing.timed_out and not tasks[id(finishing)].done()

    asyncio.run(_scenario(body))


def test_the_sweep_is_frequent_enough_for_a_short_read_timeout():
    watchdog = Watchdog(0.02, WATCH_AFTER_S)
    assert watchdog.tick_s <= 0.02 / 5
    assert watchdog.watch_after_s == 0.02  # watched (and so checked) before the timeout passes
