"""``kit start | stop``: the ``kit up`` stack run in the background, as a service; its record and lock.

How it works:

- **start** launches the very supervisor ``make up`` runs in the foreground (``python -m serve.cli up
  PROFILE ...``: vLLM, then the gateway, each in a process group of its own) as a detached process in a
  session of its own: no terminal, stdin from ``/dev/null``, its output appended to
  ``state/logs/service.log`` (vLLM and the gateway still log to ``state/logs/vllm.log`` and
  ``gateway.log``). It writes the service record ``state/service.json`` (the PID file) atomically, echoes
  the supervisor's output, and returns once the supervisor prints its ``ready:`` line (vLLM answered a
  real request and the gateway's ``/readyz`` answered). A supervisor that exits first has its error shown,
  its record removed and its exit code returned.
- **Which processes are the service's** (``serve.processes``): the supervisor is started with
  ``KIT_SERVICE_ID=<random id>`` in its environment, which its children inherit. A PID alone is not
  trusted: the recorded supervisor (``ProcessRef``) counts as running only while a process with that PID
  has the recorded start time under the same boot id, so a record whose process is gone, or whose PID was
  reused, is stale.
- **stop** sends SIGTERM to the supervisor, which stops the gateway (it drains in-flight requests for its
  ``shutdown_timeout_s``) and then vLLM (``--shutdown-timeout``, the same value unless the profile sets
  one), each process group SIGKILLed after its grace. ``stop`` waits for that plus a margin, SIGKILLs the
  process groups of whatever still carries the marker (an engine core orphaned by a crash included), and
  checks that nothing is left; only then is the record removed.
- ``kit status`` is ``serve.service_status``, ``kit logs`` ``serve.service_logs``.

One ``start`` or ``stop`` at a time per state folder (``state/service.lock``, ``flock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

from pydantic import BaseModel, ConfigDict, ValidationError

from serve.atomic import write_text_atomic
from serve.processes import (
    SERVICE_ID_ENV,
    ProcessInfo,
    boot_id,
    describe_pids,
    kill_all,
    read_process,
    service_processes,
    signal_process,
)
from serve.supervisor import stop_grace_s

logger = logging.getLogger(__name__)

READY_PREFIX = "ready: "
"""The supervisor (``kit up``) prints a line starting with this once vLLM and the gateway are ready."""

KILL_MARGIN_S = 10.0
"""How long processes get to vanish after SIGKILL before ``stop`` reports them as left over."""

LOG_NAMES = ("service", "vllm", "gateway")


class ServiceError(RuntimeError):
    """A service operation failed; the message says what to do. ``exit_code`` is the CLI's exit status."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class ServicePaths:
    """Where one kit folder keeps its service's record, lock and logs.

    Args:
        state_dir: the kit's ``state/`` folder (``kit up`` writes its logs to ``state/logs``).
    """

    state_dir: Path

    @classmethod
    def under(cls, root: Path) -> ServicePaths:
        """The paths of the kit folder ``root`` (the one holding ``configs/``)."""
        return cls(root.absolute() / "state")

    @property
    def record(self) -> Path:
        return self.state_dir / "service.json"

    @property
    def lock(self) -> Path:
        return self.state_dir / "service.lock"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def log(self, name: str) -> Path:
        """``state/logs/<name>.log`` for one of ``LOG_NAMES``."""
        return self.log_dir / f"{name}.log"


# ------------------------------------------------------------------------------------------------- record


class ProcessRef(BaseModel):
    """A process as recorded at start: its PID is only trusted together with its start time and boot."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pid: int
    start_ticks: int
    boot_id: str

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        """Record the running process ``pid``.

        Raises:
            ServiceError: no such process.
        """
        info = read_process(pid)
        if info is None:
            raise ServiceError(f"process {pid} exited before it could be recorded")
        return cls(pid=pid, start_ticks=info.start_ticks, boot_id=boot_id())

    def find(self) -> ProcessInfo | None:
        """The live process this refers to, or None if it is gone or its PID now names another process."""
        info = read_process(self.pid)
        if (
            info is None
            or not info.alive
            or info.start_ticks != self.start_ticks
            or boot_id() != self.boot_id
        ):
            return None
        return info

    def why_stale(self) -> str:
        """Why ``find()`` returned None, in words."""
        if boot_id() != self.boot_id:
            return f"process {self.pid} belonged to an earlier boot"
        info = read_process(self.pid)
        if info is None or not info.alive:
            return f"process {self.pid} has exited"
        return f"PID {self.pid} now belongs to another process ({info.command(60)})"


class ServiceRecord(BaseModel):
    """``state/service.json``: what ``start`` launched, for ``status`` and ``stop``."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    service_id: str
    supervisor: ProcessRef
    profile: str
    command: list[str]
    """The supervisor's argv."""
    started_at: float
    """Unix time (s) of the start."""
    gateway_url: str
    """The gateway's base URL as seen from this machine (``http://127.0.0.1:8080``)."""
    vllm_url: str
    """vLLM's base URL; on a Unix socket only the Host header (``http://localhost``)."""
    vllm_uds: str | None
    stop_timeout_s: float
    """How long ``stop`` waits for the supervisor's own drain before it kills what is left."""


def read_record(paths: ServicePaths) -> ServiceRecord | None:
    """The service record, or None when there is none.

    Raises:
        ServiceError: the file is unreadable or not a service record (says how to recover).
    """
    try:
        text = paths.record.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ServiceError(f"cannot read {paths.record}: {exc}") from None
    try:
        return ServiceRecord.model_validate_json(text)
    except ValidationError as exc:
        raise ServiceError(
            f"{paths.record} is not a kit service record ({exc.error_count()} problems, first: "
            f"{exc.errors()[0]['msg']}). If no service runs (`pgrep -af serve.cli`), delete the file"
        ) from None


def _write_record(paths: ServicePaths, record: ServiceRecord) -> None:
    write_text_atomic(paths.record, record.model_dump_json(indent=2) + "\n")


def _remove_record_if(paths: ServicePaths, service_id: str) -> None:
    """Delete the record only if it still describes ``service_id`` (another start may have replaced it)."""
    with contextlib.suppress(ServiceError):
        current = read_record(paths)
        if current is not None and current.service_id == service_id:
            paths.record.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive(paths: ServicePaths, wait_s: float = 10.0) -> Iterator[None]:
    """Hold ``state/service.lock`` (one ``start``/``stop`` at a time per kit folder).

    Raises:
        ServiceError: another ``start``/``stop`` held it for ``wait_s`` seconds.
    """
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    with paths.lock.open("a") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ServiceError(
                        f"another `kit start` or `kit stop` is at work on {paths.state_dir} (it holds "
                        f"{paths.lock}); let it finish, then try again"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def explain_os_errors(paths: ServicePaths) -> Iterator[None]:
    """Turn a file-system error under ``state/`` into a ``ServiceError`` that names the path and the fix
    (a broken pipe on the output passes through).

    Raises:
        ServiceError: an ``OSError`` was raised inside the block.
    """
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        where = exc.filename or paths.state_dir
        raise ServiceError(
            f"{where}: {exc.strerror or exc}; the service keeps its record and logs in {paths.state_dir}, "
            "which must be a folder you can write"
        ) from None


@dataclass(frozen=True)
class ServiceState:
    """A record and what is left of it now."""

    record: ServiceRecord
    supervisor: ProcessInfo | None
    """The recorded supervisor while it runs; None when it is gone (the record is stale)."""
    processes: list[ProcessInfo]
    """Every live process of the service (the supervisor included)."""


def inspect(record: ServiceRecord) -> ServiceState:
    """The recorded service as it is now."""
    supervisor = record.supervisor.find()
    processes = service_processes(record.service_id)
    if supervisor is not None and all(p.pid != supervisor.pid for p in processes):
        processes = sorted([*processes, supervisor], key=lambda p: p.pid)
    return ServiceState(record, supervisor, processes)


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``, ``3 d 4 h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


# -------------------------------------------------------------------------------------------------- start


@dataclass(frozen=True)
class LaunchSpec:
    """What ``start`` runs and records (built by ``kit start`` from the profile and gateway settings)."""

    command: list[str]
    """The supervisor's argv (``python -m serve.cli --root R up PROFILE ...``)."""
    profile: str
    gateway_url: str
    vllm_url: str
    vllm_uds: Path | None
    gateway_drain_s: float
    """The gateway's ``shutdown_timeout_s``."""
    vllm_drain_s: float
    """vLLM's ``--shutdown-timeout``."""
    ready_timeout_s: float
    """How long ``start`` waits for the ready line before it stops the service (the profile's
    ``startup_timeout_s`` plus the gateway's start)."""


def stop_timeout_s(gateway_drain_s: float, vllm_drain_s: float) -> float:
    """How long ``stop`` lets the supervisor stop the gateway and then vLLM, in seconds: each child's
    grace before SIGKILL (``stop_grace_s``: its drain plus 10 s, at least 15 s), one after the other, and
    15 s more for the supervisor itself."""
    return stop_grace_s(gateway_drain_s) + stop_grace_s(vllm_drain_s) + 15


def read_from(path: Path, offset: int) -> tuple[str, int]:
    """The text appended to ``path`` since ``offset`` (whole lines only) and the new offset."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return "", offset
    end = data.rfind(b"\n") + 1
    return data[:end].decode(errors="replace"), offset + end


def start(paths: ServicePaths, spec: LaunchSpec, out: TextIO, poll_s: float = 0.5) -> int:
    """Start the supervisor in the background and wait until it is ready.

    Args:
        paths: the kit folder's state paths.
        spec: what to run.
        out: receives the supervisor's output and progress lines.
        poll_s: how often the log and the process are looked at (seconds).

    Returns:
        0 once ready; the supervisor's exit code (1 if it exited with 0) when it stopped before that;
        1 when it was not ready within ``spec.ready_timeout_s`` (it is stopped first); 130 on Ctrl-C
        (the service keeps starting, and the message says so).

    Raises:
        ServiceError: it already runs, processes of an earlier one are left, or the lock is held.
    """
    log = paths.log("service")
    with exclusive(paths):
        existing = read_record(paths)
        if existing is not None:
            state = inspect(existing)
            if state.supervisor is not None:
                raise ServiceError(
                    f"the service is already running (profile {existing.profile}, supervisor pid "
                    f"{existing.supervisor.pid}, up {duration(time.time() - existing.started_at)}); "
                    "`make status` shows it; `make stop` stops it, then `make start` starts it again"
                )
            if state.processes:
                raise ServiceError(
                    f"the last service's supervisor is gone ({existing.supervisor.why_stale()}) but "
                    f"{len(state.processes)} of its processes are left (pids "
                    f"{', '.join(str(p.pid) for p in state.processes)}); `make stop` ends them"
                )
            print(f"removed a stale {paths.record} ({existing.supervisor.why_stale()})", file=out, flush=True)
            paths.record.unlink(missing_ok=True)
        paths.log_dir.mkdir(parents=True, exist_ok=True)
        service_id = secrets.token_hex(8)
        with log.open("ab") as handle:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            handle.write(f"==== kit start {stamp} profile {spec.profile} id {service_id} ====\n".encode())
            offset = handle.tell()
            process = subprocess.Popen(
                spec.command,
                env={**os.environ, SERVICE_ID_ENV: service_id},
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # no terminal: survives the shell; its own process group
            )
        record = ServiceRecord(
            service_id=service_id,
            supervisor=ProcessRef.of(process.pid),
            profile=spec.profile,
            command=spec.command,
            started_at=time.time(),
            gateway_url=spec.gateway_url,
            vllm_url=spec.vllm_url,
            vllm_uds=str(spec.vllm_uds) if spec.vllm_uds is not None else None,
            stop_timeout_s=stop_timeout_s(spec.gateway_drain_s, spec.vllm_drain_s),
        )
        _write_record(paths, record)
    print(f"started the supervisor (pid {process.pid}); its output: {log}", file=out, flush=True)
    deadline = time.monotonic() + spec.ready_timeout_s
    try:
        while True:
            text, offset = read_from(log, offset)
            if text:
                out.write(text)
                out.flush()
                if any(line.startswith(READY_PREFIX) for line in text.splitlines()):
                    print(
                        f"running in the background (supervisor pid {process.pid}); `make status`, "
                        "`make logs`, `make stop`",
                        file=out,
                        flush=True,
                    )
                    return 0
            code = process.poll()
            if code is not None:
                out.write(read_from(log, offset)[0])
                _clean_up_failed(paths, record, out)
                print(
                    f"error: the service stopped before it was ready (supervisor exit code {code}); "
                    f"above are its last words, all of them in {log}",
                    file=out,
                    flush=True,
                )
                return code or 1
            if time.monotonic() > deadline:
                print(
                    f"error: not ready after {spec.ready_timeout_s:.0f} s; stopping it. See {log} and "
                    f"{paths.log('vllm')}",
                    file=out,
                    flush=True,
                )
                stop(paths, out)
                return 1
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: the service goes on starting in the background (supervisor pid {process.pid}); "
            "`make status` shows it, `make stop` stops it",
            file=out,
            flush=True,
        )
        return 130


def _clean_up_failed(paths: ServicePaths, record: ServiceRecord, out: TextIO) -> None:
    """After a supervisor exited during start: end anything of it still running, drop its record."""
    left = service_processes(record.service_id)
    if left:
        print(f"ending {len(left)} processes it left: {describe_pids(left)}", file=out, flush=True)
        kill_all(left)
        _wait_gone(record.service_id, KILL_MARGIN_S)
    _remove_record_if(paths, record.service_id)


# --------------------------------------------------------------------------------------------------- stop


def _wait_gone(service_id: str, timeout_s: float, supervisor: ProcessRef | None = None) -> list[ProcessInfo]:
    """Wait until no process of the service (or only ``supervisor`` when given: until it is gone) is
    left; returns what is left at the end."""
    deadline = time.monotonic() + timeout_s
    while True:
        if supervisor is not None:
            left = [info] if (info := supervisor.find()) is not None else []
        else:
            left = service_processes(service_id)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


def stop(paths: ServicePaths, out: TextIO) -> int:
    """Stop the service: SIGTERM to the supervisor, wait for its drain, SIGKILL the process groups of
    whatever is left, verify that nothing is, remove the record.

    Returns:
        0 when nothing of the service runs any more (also when none was running).

    Raises:
        ServiceError: processes survived SIGKILL (named; the record is kept), or the record is corrupt.
    """
    called = time.monotonic()
    with exclusive(paths):
        logger.debug("stop: holding %s after %.2f s", paths.lock, time.monotonic() - called)
        record = read_record(paths)
        if record is None:
            print(f"not running (no {paths.record})", file=out, flush=True)
            return 0
        looked = time.monotonic()
        state = inspect(record)
        logger.debug(
            "stop: found the supervisor (%s) and %d processes of the service in %.2f s",
            "running" if state.supervisor is not None else "gone",
            len(state.processes),
            time.monotonic() - looked,
        )
        if state.supervisor is not None:
            print(
                f"stopping (supervisor pid {state.supervisor.pid}): the gateway drains in-flight requests, "
                f"then vLLM; up to {record.stop_timeout_s:.0f} s",
                file=out,
                flush=True,
            )
            began = time.monotonic()
            signal_process(state.supervisor, signal.SIGTERM)
            if _wait_gone(record.service_id, record.stop_timeout_s, record.supervisor):
                print(
                    f"the supervisor did not stop within {record.stop_timeout_s:.0f} s; killing it",
                    file=out,
                    flush=True,
                )
            else:
                print(f"the supervisor stopped after {time.monotonic() - began:.1f} s", file=out, flush=True)
        elif state.processes:
            print(
                f"the supervisor is gone ({record.supervisor.why_stale()}); ending what it left",
                file=out,
                flush=True,
            )
        else:
            print(f"not running ({record.supervisor.why_stale()}); removing the stale record", file=out)
        left = service_processes(record.service_id)
        if left:
            print(f"killing {len(left)} left-over processes: {describe_pids(left)}", file=out, flush=True)
            kill_all(left)
            left = _wait_gone(record.service_id, KILL_MARGIN_S)
        if left:
            raise ServiceError(
                f"{len(left)} processes of the service survived SIGKILL: {describe_pids(left)}; "
                f"{paths.record} is kept so that `make stop` can try again (a process stuck in the kernel, "
                "e.g. on a GPU driver call, ends only when that call returns)"
            )
        _remove_uds_if_dead(record.vllm_uds)
        _remove_record_if(paths, record.service_id)
    print("stopped; no process of the service is left", file=out, flush=True)
    return 0


def _remove_uds_if_dead(uds: str | None) -> None:
    """Remove vLLM's socket file when nobody listens on it (a killed vLLM leaves it behind)."""
    if uds is None or not Path(uds).is_socket():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(uds)
        except (ConnectionRefusedError, FileNotFoundError):
            Path(uds).unlink(missing_ok=True)
        except OSError:
            return  # not ours to judge (permissions...): prepare_uds checks it at the next start
