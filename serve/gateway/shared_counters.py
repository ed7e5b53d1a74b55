"""Per-key limit counters in memory shared by the gateway's workers on one host.

One memory-mapped file holds, per key name, the current fixed windows (minute, UTC day, calendar month)
with the requests and tokens counted in them, and, per worker, the requests in flight. Every check and
count happens under one ``flock`` on that file: a critical section of a few microseconds with no I/O in
it, on the event loop's thread, so N parallel requests against a limit of k admit exactly k whichever
worker each lands on.

A worker registers its pid in a slot of the worker table; a worker that died (uvicorn restarts it) leaves
a slot whose pid is gone, and the next worker to register clears that slot's in-flight counts. The
token counters are seeded from the usage ledger when the file is created (each ``kit gateway`` start
creates it anew), so day and month budgets survive restarts.

Layout (little-endian int64 unless noted): header (magic, version, key slots, worker slots, worker slots
used so far), worker table (pid per worker), key table (per key: name hash, minute, minute requests,
minute tokens, day, day tokens, month, month tokens), in-flight table (int32 per worker per key).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

MAGIC = 0x4B49544C494D4954  # "KITLIMIT"
VERSION = 3
_HEADER = struct.Struct("<5q")  # magic, version, key slots, worker slots, worker slots ever used
_HIGH_WATER_AT = 32
_KEY = struct.Struct("<9q")  # name hash, the window, lease recall generation
_WINDOW = struct.Struct("<7q")  # a key slot after its name hash
_GENERATION_AFTER = _WINDOW.size  # the recall generation follows the window
_PID = struct.Struct("<q")
_INFLIGHT = struct.Struct("<i")

Window = tuple[int, int, int, int, int, int, int]
"""``(minute, minute requests, minute tokens, day, day tokens, month, month tokens)`` of one key."""


class CountersFull(RuntimeError):
    """More key names are counted than the file has slots for."""


def name_hash(name: str) -> int:
    """A non-zero 63-bit hash of a key name (zero marks an empty slot)."""
    value = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1
    return value or 1


class SharedCounters:
    """The shared file, attached by one worker.

    Args:
        path: the file (created with its parent folder, mode 0600, when missing).
        seed: called once when the file is created, returns ``{key name: (day tokens, month tokens,
            minute tokens, minute requests)}`` for the current windows (from the ledger).
        windows: the current ``(minute, day, month)`` numbers, for seeding.
        key_slots / worker_slots: capacity.

    Raises:
        CountersFull: no free worker slot (more than ``worker_slots`` live workers).
    """

    def __init__(
        self,
        path: Path,
        seed: Callable[[], dict[str, tuple[int, int, int, int]]] | None = None,
        windows: tuple[int, int, int] | None = None,
        key_slots: int = 4096,
        worker_slots: int = 32,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self.key_slots = key_slots
        self.worker_slots = worker_slots
        self._workers_at = _HEADER.size
        self._keys_at = self._workers_at + worker_slots * _PID.size
        self._inflight_at = self._keys_at + key_slots * _KEY.size
        self._leases_at = self._inflight_at + worker_slots * key_slots * _INFLIGHT.size
        size = self._leases_at + worker_slots * key_slots * _INFLIGHT.size
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._slot_of: dict[str, int] = {}
        self._offsets: dict[str, tuple[int, int, int]] = {}
        with self._locked_fd():
            fresh = os.fstat(self._fd).st_size < size
            if fresh:
                os.ftruncate(self._fd, 0)
                os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size)
            if fresh or _HEADER.unpack_from(self._map, 0)[:4] != (MAGIC, VERSION, key_slots, worker_slots):
                self._map[:] = bytes(size)
                _HEADER.pack_into(self._map, 0, MAGIC, VERSION, key_slots, worker_slots, 0)
                if seed is not None and windows is not None:
                    minute, day, month = windows
                    for name, (day_tok, month_tok, minute_tok, minute_req) in seed().items():
                        slot = self._find(name, create=True)
                        _KEY.pack_into(
                            self._map,
                            self._key_offset(slot),
                            name_hash(name),
                            minute,
                            minute_req,
                            minute_tok,
                            day,
                            day_tok,
                            month,
                            month_tok,
                            0,
                        )
            self.worker = self._register()

    # -- layout -------------------------------------------------------------------------------------------
    def _key_offset(self, slot: int) -> int:
        return self._keys_at + slot * _KEY.size

    def _cell_offset(self, table_at: int, worker: int, slot: int) -> int:
        """The offset of worker ``worker``'s count for key ``slot`` in a per-worker table (in-flight
        requests at ``_inflight_at``, leases held at ``_leases_at``)."""
        return table_at + (worker * self.key_slots + slot) * _INFLIGHT.size

    @contextmanager
    def _locked_fd(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _clear_worker(self, worker: int) -> None:
        length = self.key_slots * _INFLIGHT.size
        for start in (
            self._cell_offset(self._inflight_at, worker, 0),
            self._cell_offset(self._leases_at, worker, 0),
        ):
            self._map[start : start + length] = bytes(length)

    def _register(self) -> int:
        """Take a worker slot (the first free one), after clearing every slot whose process is gone
        (their in-flight counts would otherwise count forever)."""
        pid = os.getpid()
        owners = [
            _PID.unpack_from(self._map, self._workers_at + worker * _PID.size)[0]
            for worker in range(self.worker_slots)
        ]
        if pid in owners:
            return owners.index(pid)
        for worker, owner in enumerate(owners):
            if owner != 0 and not _alive(owner):
                self._clear_worker(worker)
                _PID.pack_into(self._map, self._workers_at + worker * _PID.size, 0)
                owners[worker] = 0
        if 0 in owners:
            worker = owners.index(0)
            self._clear_worker(worker)
            _PID.pack_into(self._map, self._workers_at + worker * _PID.size, pid)
            (used,) = _PID.unpack_from(self._map, _HIGH_WATER_AT)
            _PID.pack_into(self._map, _HIGH_WATER_AT, max(used, worker + 1))
            return worker
        raise CountersFull(f"{self.path}: all {self.worker_slots} worker slots are held by live processes")

    def _find(self, name: str, create: bool) -> int:
        """The key table slot of ``name`` (open addressing); -1 when absent and not ``create``."""
        cached = self._slot_of.get(name)
        if cached is not None:
            return cached
        wanted = name_hash(name)
        start = wanted % self.key_slots
        for probe in range(self.key_slots):
            slot = (start + probe) % self.key_slots
            (found,) = struct.unpack_from("<q", self._map, self._key_offset(slot))
            if found == wanted:
                self._slot_of[name] = slot
                return slot
            if found == 0:
                if not create:
                    return -1
                struct.pack_into("<q", self._map, self._key_offset(slot), wanted)
                self._slot_of[name] = slot
                return slot
        raise CountersFull(f"{self.path}: all {self.key_slots} key slots are in use")

    # -- the operations used by the limiter -----------------------------------------------------------------
    def lock(self) -> None:
        """Take the lock for a read-check-write (keep what follows free of I/O and awaits; ``unlock``
        in a ``finally``). Plain calls, not a context manager: this runs twice per limited request."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        """Release the lock taken by ``lock``."""
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """``lock`` ... ``unlock`` as a context manager, for code off the request path."""
        with self._locked_fd():
            yield

    def offsets(self, name: str) -> tuple[int, int, int]:
        """``(windows offset, this worker's in-flight offset, key slot)`` of ``name``, for the ``*_at``
        operations (found once per name, then remembered: slots never move)."""
        cached = self._offsets.get(name)
        if cached is None:
            slot = self._find(name, create=True)
            cached = (
                self._key_offset(slot) + 8,
                self._cell_offset(self._inflight_at, self.worker, slot),
                slot,
            )
            self._offsets[name] = cached
        return cached

    def read_at(self, at: int) -> Window:
        """The windows stored at offset ``at`` (call under ``lock``)."""
        return _WINDOW.unpack_from(self._map, at)  # type: ignore[return-value]

    def write_at(self, at: int, window: Window) -> None:
        """Store windows at offset ``at`` (call under ``lock``)."""
        _WINDOW.pack_into(self._map, at, *window)

    def generation_at(self, at: int) -> int:
        """The lease recall generation of the key whose windows are at ``at``. It may be read without
        the lock (one aligned 8-byte load: a value before or after a change, never a mix); change it
        under the lock."""
        return _PID.unpack_from(self._map, at + _GENERATION_AFTER)[0]

    def recall_at(self, at: int) -> None:
        """Ask every worker to give back its lease of the key (call under ``lock``)."""
        _PID.pack_into(self._map, at + _GENERATION_AFTER, self.generation_at(at) + 1)

    def add_lease_holder(self, slot: int, delta: int) -> None:
        """Count a lease of key ``slot`` taken (+1) or given back (-1) in this worker (call under
        ``lock``)."""
        self._add_at(self._cell_offset(self._leases_at, self.worker, slot), delta)

    def lease_holders(self, slot: int) -> int:
        """Leases of key ``slot`` held in every worker (call under ``lock``)."""
        return self._sum_over_workers(self._leases_at, slot)

    def workers(self) -> int:
        """How many worker slots have been used (live or not): leases are sized by it."""
        return max(1, _PID.unpack_from(self._map, _HIGH_WATER_AT)[0])

    def in_flight_of(self, slot: int) -> int:
        """Requests of key ``slot`` in flight on every worker (call under ``lock``)."""
        return self._sum_over_workers(self._inflight_at, slot)

    def add_in_flight_at(self, at: int, delta: int) -> None:
        """Change the in-flight count at offset ``at`` (this worker's; call under ``lock``)."""
        self._add_at(at, delta)

    def _sum_over_workers(self, table_at: int, slot: int) -> int:
        """Key ``slot``'s counts in a per-worker table, added up over every worker slot used."""
        (workers,) = _PID.unpack_from(self._map, _HIGH_WATER_AT)
        total = 0
        for worker in range(workers):  # a loop, not sum() over a generator: this runs per admission
            total += _INFLIGHT.unpack_from(self._map, self._cell_offset(table_at, worker, slot))[0]
        return total

    def _add_at(self, at: int, delta: int) -> None:
        """Add ``delta`` to the per-worker count at offset ``at``, never below zero."""
        (count,) = _INFLIGHT.unpack_from(self._map, at)
        _INFLIGHT.pack_into(self._map, at, max(0, count + delta))

    def read(self, name: str) -> Window:
        """The key's windows as stored (call under ``lock``)."""
        return self.read_at(self.offsets(name)[0])

    def close(self) -> None:
        """Give the worker slot back and unmap."""
        with self._locked_fd():
            self._clear_worker(self.worker)
            _PID.pack_into(self._map, self._workers_at + self.worker * _PID.size, 0)
        self._map.close()
        os.close(self._fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
