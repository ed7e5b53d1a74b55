"""The gateway worker's garbage-collector policy: what it started with is frozen, young collections wait
for more allocations.

A worker holds ~93,000 tracked objects once its app is built (SQLAlchemy, pydantic, FastAPI, aiohttp,
Prometheus), against ~35,000 for a bare ASGI + aiohttp pass-through. Under load (64 clients, 2
workers, the shared gateway-bench harness) Python's default thresholds (700, 10, 10) ran ~800
generation-0 collections and ~6 full ones per worker in 15 s, about 75 us of CPU per request: the full
collections walked the whole start-up heap, and each generation-0 pass promoted the objects of the
requests in flight at that moment, which fed the next full collection.

``gc.freeze()`` moves every object alive at start-up into the permanent generation, which collections
skip (Python docs, ``gc.freeze``); a generation-0 threshold above the objects a worker's in-flight
requests hold at once (measured: never 20,000 net allocations under that load) means a request's
objects are freed by reference counting before a collection ever looks at them. Cyclic garbage is
still collected, once that many container objects have accumulated.
"""

from __future__ import annotations

import gc


def tune_gc(gen0_threshold: int | None) -> None:
    """Freeze the objects alive now and raise the generation-0 threshold to ``gen0_threshold`` (net
    container allocations), for the rest of the process. None: leave the collector as it is.

    Call it once per worker process, after its app is built: ``create_app_from_env`` (uvicorn's factory)
    does. ``create_app`` does not, so a gateway run inside another process (the tests) leaves that
    process's collector alone."""
    if gen0_threshold is None:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(gen0_threshold, *gc.get_threshold()[1:])
