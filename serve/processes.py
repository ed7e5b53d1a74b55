"""Which processes are a service's, read from ``/proc``, and how they are signalled.

- **Membership.** The supervisor is started with ``KIT_SERVICE_ID=<random id>`` in its environment;
  vLLM, its engine core and the gateway's workers inherit it. A process belongs to the service when it
  carries that marker (``/proc/PID/environ``), or is in a process group led by one that does.
- **Identity.** A process is named by its PID together with its start time (``/proc/PID/stat`` field 22,
  clock ticks since boot) under one boot id (``serve.service.ProcessRef`` records the three).
- **Signals** to single processes go through a pidfd opened and re-checked first, so a PID reused
  meanwhile is never signalled; a process group only while one of its members is verified alive.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

SERVICE_ID_ENV = "KIT_SERVICE_ID"
"""The environment variable that marks every process of one service."""


@dataclass(frozen=True)
class ProcessInfo:
    """One process as ``/proc`` shows it."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    """``R``, ``S``, ``Z`` (zombie: exited, not yet reaped)..."""
    start_ticks: int
    """Start time in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    cmdline: tuple[str, ...]
    marker: str | None
    """Its ``KIT_SERVICE_ID``, or None (not set, or another user's process)."""

    @property
    def alive(self) -> bool:
        """Still running (a zombie has exited and only waits for its parent)."""
        return self.state not in {"Z", "X"}

    def command(self, width: int = 100) -> str:
        text = " ".join(self.cmdline) or "?"
        return text if len(text) <= width else text[: width - 3] + "..."


def boot_id() -> str:
    """This boot's id (``/proc/sys/kernel/random/boot_id``): start times in ticks compare only within it."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def read_process(pid: int) -> ProcessInfo | None:
    """``/proc``'s view of ``pid``, or None when no such process exists."""
    base = Path("/proc") / str(pid)
    try:
        stat = (base / "stat").read_text()
        cmdline = (base / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: the fields after it start past the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    marker = None
    try:
        for entry in (base / "environ").read_bytes().split(b"\0"):
            if entry.startswith(SERVICE_ID_ENV.encode() + b"="):
                marker = entry.split(b"=", 1)[1].decode(errors="replace")
    except (PermissionError, FileNotFoundError, ProcessLookupError):
        pass
    return ProcessInfo(
        pid=pid,
        ppid=int(fields[1]),
        pgid=int(fields[2]),
        sid=int(fields[3]),
        state=fields[0],
        start_ticks=int(fields[19]),
        cmdline=tuple(part.decode(errors="replace") for part in cmdline.split(b"\0") if part),
        marker=marker,
    )


def service_processes(service_id: str) -> list[ProcessInfo]:
    """Every live process of the service ``service_id``, sorted by PID.

    A process belongs to it when it carries ``KIT_SERVICE_ID=<service_id>`` or is in a process group
    whose leader does (the caller's own group never counts).
    """
    infos = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := read_process(int(entry.name))) is not None and info.alive:
            infos.append(info)
    marked = {info.pid for info in infos if info.marker == service_id}
    groups = {info.pgid for info in infos if info.pid in marked and info.pgid == info.pid}
    groups.discard(os.getpgrp())
    return [info for info in infos if info.pid in marked or info.pgid in groups]


def signal_process(info: ProcessInfo, sig: signal.Signals) -> bool:
    """Send ``sig`` to ``info``'s process if that PID still names the same process (via a pidfd, so a
    PID reused meanwhile is never hit). Returns whether it was sent."""
    try:
        fd = os.pidfd_open(info.pid)
    except ProcessLookupError:
        return False
    try:
        now = read_process(info.pid)
        if now is None or now.start_ticks != info.start_ticks:
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def kill_all(processes: list[ProcessInfo]) -> None:
    """SIGKILL the process groups of ``processes`` (a group is only signalled while one of its processes
    is verified alive, so its id cannot have been reused), then any of them still alive, one by one."""
    own = os.getpgrp()
    for pgid in sorted({p.pgid for p in processes} - {own}):
        members = [p for p in processes if p.pgid == pgid]
        if any(
            (now := read_process(p.pid)) is not None and now.start_ticks == p.start_ticks for p in members
        ):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
    for process in processes:
        signal_process(process, signal.SIGKILL)


def describe_pids(processes: list[ProcessInfo]) -> str:
    """``PID (command), ...`` of ``processes``, for messages."""
    return ", ".join(f"{p.pid} ({p.command(50)})" for p in processes)
