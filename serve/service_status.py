"""``kit status``: the service's state in words (health of vLLM and the gateway, served models and
adapters, GPU memory, uptime, PIDs, log paths) and an exit code.

Exit codes follow LSB / ``systemctl status``: 0 running, 1 not running but processes of it are left
(``make stop`` removes them), 3 not running.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import TextIO

import httpx

from serve.processes import SERVICE_ID_ENV, ProcessInfo, describe_pids
from serve.service import LOG_NAMES, ServicePaths, ServiceRecord, duration, inspect, read_record
from serve.supervisor import http_client

STATUS_RUNNING, STATUS_DEAD, STATUS_NOT_RUNNING = 0, 1, 3
"""``kit status`` exit codes (LSB init-script conventions)."""


def _role(process: ProcessInfo, leaders: dict[int, ProcessInfo], supervisor_pid: int | None) -> str:
    leader = leaders.get(process.pgid, process)
    command = " ".join(leader.cmdline)
    if leader.pid == supervisor_pid:
        return "supervisor"
    if "vllm_launcher" in command or Path((leader.cmdline or ("",))[0]).name == "vllm":
        return "vllm"
    if command.endswith("serve.cli gateway"):
        return "gateway"
    return "other"


def _probe(client: httpx.Client, url: str) -> tuple[bool, str]:
    try:
        reply = client.get(url)
    except httpx.HTTPError as exc:
        return False, f"no answer ({type(exc).__name__})"
    return reply.status_code == 200, f"{reply.status_code}"


def served_models(record: ServiceRecord, timeout_s: float = 5.0) -> tuple[list[str], list[str], str | None]:
    """vLLM's ``/v1/models`` (asked directly, over its socket when it has one; the gateway's needs a key).

    Returns:
        ``(base models, adapters as "name (on base)", error or None)``.
    """
    uds = Path(record.vllm_uds) if record.vllm_uds else None
    try:
        with http_client(uds, timeout=timeout_s) as client:
            reply = client.get(record.vllm_url + "/v1/models")
        reply.raise_for_status()
        data = reply.json()["data"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        return [], [], f"{type(exc).__name__}: {exc}"
    bases = [m["id"] for m in data if not m.get("parent")]
    adapters = [f"{m['id']} (on {m['parent']})" for m in data if m.get("parent")]
    return bases, adapters, None


def gpu_lines(pids: set[int], timeout_s: float = 10.0) -> list[str]:
    """GPU memory per GPU (``nvidia-smi``), and how much of it the service's processes hold.

    Args:
        pids: the service's processes.
        timeout_s: for each ``nvidia-smi`` call.

    Returns:
        One line per GPU and one for the service's share; ``["no GPU (...)"]`` where nvidia-smi is absent
        or fails.
    """

    def smi(query: str) -> str:
        return subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        ).stdout

    try:
        gpus = smi("--query-gpu=index,name,memory.used,memory.total")
    except FileNotFoundError:
        return ["no GPU (nvidia-smi not found)"]
    except (OSError, subprocess.SubprocessError) as exc:
        return [f"no GPU (nvidia-smi failed: {exc})"]
    lines = []
    for row in gpus.splitlines():
        parts = [part.strip() for part in row.split(",")]
        if len(parts) == 4:
            index, name, used, total = parts
            lines.append(f"GPU {index} {name}: {used} / {total} MiB used")
    if not lines:
        return ["no GPU (nvidia-smi lists none)"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        ours = 0
        for row in smi("--query-compute-apps=pid,used_memory").splitlines():
            parts = [part.strip() for part in row.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids and parts[1].isdigit():
                ours += int(parts[1])
        lines.append(f"held by the service's processes: {ours} MiB")
    return lines


def status(paths: ServicePaths, out: TextIO, probe_timeout_s: float = 5.0) -> int:
    """Print the service's state: health of vLLM and the gateway, served models and adapters, GPU
    memory, uptime, PIDs and log paths.

    Returns:
        ``STATUS_RUNNING`` (0) while the supervisor runs (healthy or not: the lines say), ``STATUS_DEAD``
        (1) when it is gone but processes of it are left, ``STATUS_NOT_RUNNING`` (3) otherwise.

    Raises:
        ServiceError: the record is corrupt.
    """
    logs = ", ".join(str(paths.log(name)) for name in LOG_NAMES)
    record = read_record(paths)
    if record is None:
        print(f"not running (no {paths.record}); `make start` starts it", file=out)
        return STATUS_NOT_RUNNING
    state = inspect(record)
    if state.supervisor is None:
        if state.processes:
            print(
                f"dead: the supervisor is gone ({record.supervisor.why_stale()}) but {len(state.processes)} "
                f"of its processes are left: {describe_pids(state.processes)}\n"
                f"`make stop` ends them; logs: {logs}",
                file=out,
            )
            return STATUS_DEAD
        print(
            f"not running: {paths.record} is stale ({record.supervisor.why_stale()}); `make start` replaces "
            f"it. Logs: {logs}",
            file=out,
        )
        return STATUS_NOT_RUNNING
    uds = Path(record.vllm_uds) if record.vllm_uds else None
    with http_client(uds, timeout=probe_timeout_s) as client:
        vllm_ok, vllm_said = _probe(client, record.vllm_url + "/health")
    with httpx.Client(timeout=probe_timeout_s, verify=False) as client:  # our own gateway, maybe self-signed
        gateway_ok, gateway_said = _probe(client, record.gateway_url + "/readyz")
    health = "ready" if vllm_ok and gateway_ok else "not ready (starting, or unhealthy: see the logs)"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.started_at))
    where = f"socket {uds}" if uds else record.vllm_url
    lines = [
        f"running, {health}: profile {record.profile}, up {duration(time.time() - record.started_at)} "
        f"(since {started})",
        f"  vLLM      /health {vllm_said} ({where})",
        f"  gateway   /readyz {gateway_said} ({record.gateway_url}/v1)",
    ]
    bases, adapters, error = served_models(record, probe_timeout_s) if vllm_ok else ([], [], "vLLM down")
    if error:
        lines.append(f"  models    unknown ({error})")
    else:
        lines.append(f"  models    {', '.join(bases) or '(none)'}")
        lines.append(f"  adapters  {', '.join(adapters) or '(none loaded)'}")
    pids = {p.pid for p in state.processes}
    lines += [f"  GPU       {line}" for line in gpu_lines(pids)]
    leaders = {p.pid: p for p in state.processes if p.pid == p.pgid}
    lines.append(f"  processes ({len(state.processes)}, {SERVICE_ID_ENV}={record.service_id}):")
    for process in state.processes:
        role = _role(process, leaders, state.supervisor.pid)
        lines.append(f"    {process.pid:>7} {role:<10} group {process.pgid:<7} {process.command(70)}")
    lines.append(f"  logs      {logs}")
    print("\n".join(lines), file=out)
    return STATUS_RUNNING
