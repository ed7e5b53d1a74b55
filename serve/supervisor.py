"""Start, watch and stop the vLLM engine and the gateway as child processes.

Each child runs in its own process group, so stopping it also stops what it spawned (vLLM's engine core):
SIGTERM to the group, then SIGKILL after a grace period. Readiness of vLLM means one real request was
answered, not just ``/health``: an engine that cannot run the model passes ``/health`` and dies at the
first request (docs/reference.md#vllm-cpu-serving-facts).

vLLM answers every route without a key (``/invocations``, ``/v1/load_lora_adapter``...), so by default it
listens on a Unix socket in a folder only the service's user can open; the readiness checks and the
gateway connect to that socket. Loopback TCP stays available as a profile option (``vllm.uds: null``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from serve.config import ResolvedProfile, VllmArgs
from serve.render import render

logger = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """A child process died or did not become ready; the message holds the end of its log."""


def free_port(below_ephemeral: bool = False) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Args:
        below_ephemeral: pick from 20000-29999, under Linux's ephemeral range (32768+), where no process
            gets a port by chance: for a port chosen now but bound only later (vLLM opens ephemeral
            ports of its own while it starts).
    """
    if below_ephemeral:
        for port in random.Random().sample(range(20000, 30000), 200):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
        raise StartupError("no free port between 20000 and 29999")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class Child:
    """One supervised process whose output goes to ``log_path``.

    Args:
        name: for messages (``vllm``, ``gateway``).
        argv: the command.
        env: the complete environment.
        log_path: file receiving stdout and stderr (appended).
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def check_alive(self) -> None:
        """Raise ``StartupError`` with the log's end if the process has exited."""
        if not self.alive():
            raise StartupError(
                f"{self.name} exited with code {self.process.returncode}; last lines of {self.log_path}:\n"
                f"{_tail(self.log_path)}"
            )

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process group, wait up to ``grace_s`` seconds, then SIGKILL it."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s; killing it", self.name, grace_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # Children of the group that outlive their parent (e.g. an engine core) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


def vllm_address(args: VllmArgs) -> tuple[str, Path | None]:
    """Where vLLM for ``args`` answers: the base URL and, on a Unix socket, the socket's path.

    Returns:
        ``(url, uds)``. On a socket the URL only names the Host header and builds request URLs
        (``http://localhost``); the connection goes to ``uds``. On TCP ``uds`` is None.
    """
    if args.uds is not None:
        return "http://localhost", args.uds
    host = f"[{args.host}]" if ":" in args.host else args.host
    return f"http://{host}:{args.port}", None


def http_client(uds: Path | None = None, timeout: float = 30) -> httpx.Client:
    """An httpx client that reaches vLLM over ``uds`` when given, else over TCP."""
    transport = httpx.HTTPTransport(uds=str(uds)) if uds is not None else None
    return httpx.Client(transport=transport, timeout=timeout)


def prepare_uds(path: Path) -> None:
    """Make the socket's folder private and clear a socket file left by a server that died.

    The folder is created with mode 0700; an existing one must belong to this user and have no group or
    other permissions, because whoever can open the folder can call vLLM's unguarded routes.

    Args:
        path: the socket vLLM will bind (``vllm.uds``).

    Raises:
        StartupError: the folder is another user's or open to others, the path is not a socket, or a
            server already answers on it.
    """
    folder = path.parent
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)
        folder.chmod(0o700)  # mkdir's mode passes through the umask
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise StartupError(
            f"{folder} (the folder of vLLM's socket) must be yours with mode 0700, so that only you reach "
            f"vLLM; it is mode {stat.S_IMODE(info.st_mode):o}, owner uid {info.st_uid}. Run "
            f"`chmod 700 {folder}` or put vllm.uds in a folder of its own (--set vllm.uds=...)"
        )
    if not (path.exists() or path.is_symlink()):
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise StartupError(f"{path} exists and is not a socket; remove it or choose another vllm.uds")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # nobody listens: left by a server that was killed
            return
    raise StartupError(
        f"a server already listens on {path} (another `make up` from this folder?); stop it, or serve "
        "this one on another socket with --set vllm.uds=..."
    )


def wait_vllm_ready(
    child: Child, base_url: str, model: str, timeout_s: float, uds: Path | None = None
) -> float:
    """Wait until vLLM answers ``/health`` and then one real one-token completion.

    Args:
        child: the vLLM process (its death ends the wait).
        base_url: vLLM's base URL (on a socket, only the Host header).
        model: the served model id for the test completion.
        timeout_s: how long to wait.
        uds: vLLM's Unix socket, when it listens on one.

    Returns:
        Seconds waited.

    Raises:
        StartupError: the process died or ``timeout_s`` passed.
    """
    start = time.monotonic()
    healthy = False
    with http_client(uds, timeout=30) as client:
        while time.monotonic() - start < timeout_s:
            child.check_alive()
            try:
                if not healthy:
                    healthy = client.get(base_url + "/health").status_code == 200
                if healthy:
                    reply = client.post(
                        base_url + "/v1/completions",
                        json={"model": model, "prompt": "Hello", "max_tokens": 1},
                    )
                    if reply.status_code == 200:
                        return time.monotonic() - start
                    raise StartupError(
                        f"vLLM is up but a first request failed ({reply.status_code}): "
                        f"{reply.text[:500]}\nlast lines of {child.log_path}:\n"
                        f"{_tail(child.log_path)}"
                    )
            except httpx.TransportError:
                pass
            time.sleep(0.5)
    raise StartupError(
        f"vLLM was not ready after {timeout_s:.0f} s; last lines of {child.log_path}:\n"
        f"{_tail(child.log_path)}"
    )


def wait_gateway_ready(child: Child, base_url: str, timeout_s: float = 60) -> None:
    """Wait until the gateway answers ``/readyz`` with 200.

    Raises:
        StartupError: the gateway died or ``timeout_s`` passed.
    """
    start = time.monotonic()
    with httpx.Client(timeout=10) as client:
        while time.monotonic() - start < timeout_s:
            child.check_alive()
            with contextlib.suppress(httpx.TransportError):
                if client.get(base_url + "/readyz").status_code == 200:
                    return
            time.sleep(0.2)
    raise StartupError(
        f"gateway was not ready after {timeout_s:.0f} s; last lines of {child.log_path}:\n"
        f"{_tail(child.log_path)}"
    )


def scratch_env(scratch: Path) -> dict[str, str]:
    """Point vLLM's socket files and compile caches into ``scratch`` (keeps tests and demos hermetic)."""
    paths = {
        "TMPDIR": scratch / "tmp",
        "VLLM_CACHE_ROOT": scratch / "vllm-cache",
        "TORCHINDUCTOR_CACHE_DIR": scratch / "inductor",
    }
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    return {k: str(v) for k, v in paths.items()}


def start_vllm(resolved: ResolvedProfile, log_path: Path, extra_env: dict[str, str] | None = None) -> Child:
    """Start vLLM for ``resolved`` (its ``vllm.uds`` or ``vllm.port`` must already be final).

    Raises:
        StartupError: the socket's folder is not private, or a server already answers on the socket.
    """
    if resolved.profile.vllm.uds is not None:
        prepare_uds(resolved.profile.vllm.uds)
    command = render(resolved)
    env = {**os.environ, **command.env, **(extra_env or {})}
    # Run the venv's own `vllm` script whichever way the kit was started.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    logger.info("starting vLLM: %s", command.shell())
    return Child("vllm", command.argv, env, log_path)


def gateway_env(
    upstream_url: str,
    port: int,
    keys_db: Path,
    models: list[str],
    workers: int = 1,
    host: str = "127.0.0.1",
    chat_template_kwargs: dict[str, dict[str, Any]] | None = None,
    upstream_uds: Path | None = None,
    read_timeout_s: float | None = None,
    model_aliases: dict[str, str] | None = None,
    non_thinking_sampling: dict[str, dict[str, Any]] | None = None,
    runtime_adapters: tuple[Path, Path, int] | None = None,
) -> dict[str, str]:
    """``KIT_GATEWAY_*`` variables for a gateway in front of ``upstream_url`` (reached over the Unix
    socket ``upstream_uds`` when given). ``runtime_adapters``: ``(adapters_dir, base model folder,
    max_lora_rank)`` when admins may load adapters at runtime."""
    env = {
        "KIT_GATEWAY_UPSTREAM_URL": upstream_url,
        "KIT_GATEWAY_PORT": str(port),
        "KIT_GATEWAY_HOST": host,
        "KIT_GATEWAY_KEYS_DB": str(keys_db),
        "KIT_GATEWAY_SERVED_MODEL_NAMES": json.dumps(models),
        "KIT_GATEWAY_WORKERS": str(workers),
    }
    if chat_template_kwargs:
        env["KIT_GATEWAY_DEFAULT_CHAT_TEMPLATE_KWARGS"] = json.dumps(chat_template_kwargs)
    # Always set: a TCP profile must override an upstream_uds from configs/gateway.yaml.
    env["KIT_GATEWAY_UPSTREAM_UDS"] = str(upstream_uds) if upstream_uds is not None else ""
    if read_timeout_s is not None:
        env["KIT_GATEWAY_UPSTREAM_READ_TIMEOUT_S"] = str(read_timeout_s)
    if model_aliases:
        env["KIT_GATEWAY_MODEL_ALIASES"] = json.dumps(model_aliases)
    if non_thinking_sampling:
        env["KIT_GATEWAY_NON_THINKING_SAMPLING"] = json.dumps(non_thinking_sampling)
    if runtime_adapters is not None:
        adapters_dir, base_dir, max_rank = runtime_adapters
        env["KIT_GATEWAY_ADAPTERS_DIR"] = str(adapters_dir)
        env["KIT_GATEWAY_BASE_MODEL_DIR"] = str(base_dir)
        env["KIT_GATEWAY_MAX_LORA_RANK"] = str(max_rank)
    return env


def gateway_model_env(resolved: ResolvedProfile, root: Path) -> dict[str, Any]:
    """The ``gateway_env`` arguments a profile's model gives: its aliases, its non-thinking sampling
    preset (``sampling.non_thinking`` of the model config) and, with ``adapters_dir``, runtime adapters."""
    name = resolved.model.served_model_name
    preset = resolved.model.sampling.get("non_thinking")
    adapters_dir = resolved.profile.adapters_dir
    max_rank = resolved.profile.vllm.max_lora_rank
    return {
        "model_aliases": {alias: name for alias in resolved.model.aliases},
        "non_thinking_sampling": {name: preset.model_dump(exclude_none=True)} if preset is not None else {},
        "runtime_adapters": (
            (
                adapters_dir if adapters_dir.is_absolute() else root / adapters_dir,
                resolved.model_dir,
                max_rank,
            )
            if adapters_dir is not None and max_rank is not None
            else None
        ),
    }


# The slowest decode the kit plans for (tokens/s of one sequence): a non-streamed answer is silent until
# it is complete, so the gateway's read timeout must cover max_model_len tokens at this rate.
SLOWEST_DECODE_TOKENS_PER_S = 10


def upstream_read_timeout_s(resolved: ResolvedProfile, floor_s: float = 3600.0) -> float:
    """The gateway's ``upstream_read_timeout_s`` for a profile: the longest generation it allows
    (``max_model_len``, else the model's ``max_position_embeddings``) at ``SLOWEST_DECODE_TOKENS_PER_S``,
    and at least ``floor_s`` (h200's 262,144 tokens: 26,214 s)."""
    length = resolved.profile.vllm.max_model_len
    if length is None:
        try:
            config = json.loads((resolved.model_dir / "config.json").read_text())
            length = config.get("max_position_embeddings") or config.get("text_config", {}).get(
                "max_position_embeddings"
            )
        except (OSError, ValueError):
            length = None
    return max(floor_s, (length or 0) / SLOWEST_DECODE_TOKENS_PER_S)


def adapter_chat_template_kwargs(lora_modules: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Per adapter name, the ``chat_template_kwargs`` it was trained for (``serving`` in the
    ``kit-adapter.json`` that ``make finetune`` writes, e.g. ``{"enable_thinking": false}`` for an
    adapter trained on answers without reasoning). Adapters from elsewhere have none."""
    out: dict[str, dict[str, Any]] = {}
    for name, path in lora_modules.items():
        info_path = Path(path) / "kit-adapter.json"
        if not info_path.is_file():
            continue
        try:
            kwargs = json.loads(info_path.read_text()).get("serving", {}).get("chat_template_kwargs")
        except (ValueError, AttributeError):
            logger.warning("%s is not valid JSON; serving %s without its template defaults", info_path, name)
            continue
        if isinstance(kwargs, dict) and kwargs:
            out[name] = kwargs
    return out


def start_gateway(env_overrides: dict[str, str], log_path: Path) -> Child:
    """Start ``kit gateway`` as a child with ``env_overrides`` on top of this environment."""
    env = {**os.environ, **env_overrides}
    return Child("gateway", [sys.executable, "-m", "serve.cli", "gateway"], env, log_path)


def stop_grace_s(shutdown_timeout_s: float | None) -> float:
    """Seconds between SIGTERM and SIGKILL for a child that drains for ``shutdown_timeout_s`` (None: it
    does not drain): the drain plus 10 s to exit, at least 15 s."""
    return max(15.0, (shutdown_timeout_s or 0) + 10.0)


@dataclass
class Stack:
    """A running vLLM + gateway pair."""

    vllm: Child
    gateway: Child
    vllm_url: str
    """vLLM's base URL; on a Unix socket only the Host header (``http://localhost``)."""
    gateway_url: str
    served_model_name: str
    vllm_uds: Path | None = None
    """vLLM's Unix socket, or None when it serves on loopback TCP."""

    def children(self) -> list[Child]:
        return [self.gateway, self.vllm]

    def vllm_client(self, timeout: float = 30) -> httpx.Client:
        """An httpx client for calling vLLM directly (over its socket when it has one)."""
        return http_client(self.vllm_uds, timeout)


@contextlib.contextmanager
def run_stack(
    resolved: ResolvedProfile,
    *,
    keys_db: Path,
    log_dir: Path,
    gateway_port: int | None = None,
    gateway_host: str = "127.0.0.1",
    gateway_workers: int = 1,
    scratch: Path | None = None,
) -> Iterator[Stack]:
    """Start vLLM, wait for a real answer, start the gateway, wait for ``/readyz``; stop both on exit.

    Args:
        resolved: the profile to serve (its ``vllm.uds``, or ``vllm.port`` on TCP, is where vLLM
            listens; the gateway reaches it there).
        keys_db: the gateway's key database.
        log_dir: receives ``vllm.log`` and ``gateway.log``.
        gateway_port: where the gateway listens; None picks a free port once vLLM is up (vLLM opens
            ports of its own while it starts, so a port picked earlier may be taken by then), and picks
            again if another process wins the race for it.
        gateway_host: the gateway's bind address.
        gateway_workers: uvicorn workers.
        scratch: when set, vLLM's temp files and caches go there.

    Raises:
        StartupError: a process died or was not ready in time (both are stopped first).
    """
    vllm_url, uds = vllm_address(resolved.profile.vllm)
    name = resolved.model.served_model_name
    vllm = start_vllm(resolved, log_dir / "vllm.log", scratch_env(scratch) if scratch else None)
    gateway: Child | None = None
    try:
        waited = wait_vllm_ready(vllm, vllm_url, name, resolved.profile.startup_timeout_s, uds)
        logger.info("vLLM answered its first request after %.1f s", waited)
        for attempt in range(1 if gateway_port is not None else 3):
            port = gateway_port if gateway_port is not None else free_port(below_ephemeral=True)
            gateway_url = f"http://127.0.0.1:{port}"
            env = gateway_env(
                vllm_url,
                port,
                keys_db,
                [name],
                gateway_workers,
                gateway_host,
                adapter_chat_template_kwargs(resolved.profile.vllm.lora_modules),
                uds,
                upstream_read_timeout_s(resolved),
                **gateway_model_env(resolved, resolved.path.parents[2]),  # configs/serve/<profile>.yaml
            )
            gateway = start_gateway(env, log_dir / "gateway.log")
            try:
                wait_gateway_ready(gateway, gateway_url)
                break
            except StartupError as exc:
                if gateway_port is not None or "address already in use" not in str(exc) or attempt == 2:
                    raise
                logger.warning("port %d was taken before the gateway bound it; trying another", port)
        assert gateway is not None
        yield Stack(vllm, gateway, vllm_url, gateway_url, name, uds)
    finally:
        # Each child gets its drain (vLLM's --shutdown-timeout; `kit up` gives the gateway's
        # shutdown_timeout_s the same value) before SIGKILL, so a drain is never cut short.
        grace = stop_grace_s(resolved.profile.vllm.shutdown_timeout)
        if gateway is not None:
            gateway.stop(grace)
        vllm.stop(grace)
        if uds is not None and uds.is_socket():
            uds.unlink(missing_ok=True)  # vLLM leaves its socket file behind
