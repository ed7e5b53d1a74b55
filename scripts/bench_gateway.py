"""What the gateway adds: direct to a fast fake upstream vs through the real gateway, in one run.

    make bench-gateway                          # ~5 min: 3 rounds x 10 s per scenario and target
    make bench-gateway BENCH_ARGS=--quick       # ~1 min: 2 rounds x 3 s
    .venv/bin/python scripts/bench_gateway.py --rounds 5 --duration 20 --gateway-cmd "..." --no-readme

Starts the fake upstream (``bench_gateway_upstream.py``, fixed replies), creates a key, starts the gateway
(``python -m serve.cli gateway``, 2 workers, in front of that upstream), waits for ``/readyz``, checks both
targets return the upstream's text streamed and not, warms both up, then runs every scenario on both
targets in rounds whose order alternates (direct, gateway / gateway, direct / ...) so that drift on a
shared machine hits both alike. Load comes from ``bench_gateway_loadgen.py`` in this process (closed loop,
keep-alive, exact percentiles). For every run it records CPU seconds of the load generator, the upstream,
the gateway's process tree (and per process) and everything else on the machine (``/proc``); a run during
which other processes used more than 0.3 cores is run again while the retry budget lasts.

Writes ``bench/gateway-<date>.json`` (every run, machine facts) and the table between the
``bench-gateway`` markers in README.md. Everything listens on 127.0.0.1; every process started runs in
its own session and is stopped with its whole group, also on failure, Ctrl-C or the overall time limit.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import inspect
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `serve` when run as a script from anywhere

import bench_gateway_upstream as upstream_mod  # noqa: E402
from bench_gateway_loadgen import Target, run_load  # noqa: E402

from serve.atomic import unused_path, write_text_atomic  # noqa: E402

README_START, README_END = "<!-- bench-gateway:start -->", "<!-- bench-gateway:end -->"
STREAM_CHUNKS = 32  # events per stream before usage and [DONE], as a short chat answer
NOISY_OTHER_CORES = 0.3  # a run during which other processes used more than this is run again
TICKS = os.sysconf("SC_CLK_TCK")
DEFAULT_GATEWAY_CMD = "python -m serve.cli gateway"


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    stream: bool
    clients: int


SCENARIOS = (
    Scenario("ns_c1", "non-stream, 1 client", False, 1),
    Scenario("ns_c64", "non-stream, 64 clients", False, 64),
    Scenario("st_c1", "stream, 1 client", True, 1),
    Scenario("st_c16", "stream, 16 clients", True, 16),
)
# Per scenario, the figures summarised (the load generator's names; "first" is TTFT for a stream).
METRICS = {
    False: ["total_p50_ms", "total_p90_ms", "total_p99_ms", "rps"],
    True: ["first_p50_ms", "first_p90_ms", "first_p99_ms", "total_p50_ms", "rps"],
}


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, file=sys.stderr, flush=True)


# ---------- processes and CPU ----------
class Proc:
    """A child in its own session (so its whole tree stops together), output to a log file."""

    def __init__(self, name: str, cmd: list[str] | str, log_path: Path, env: dict[str, str] | None = None):
        self.name, self.log_path = name, log_path
        log(f"start {name}: {cmd if isinstance(cmd, str) else shlex.join(cmd)}")
        with open(log_path, "wb") as out:
            self.popen = subprocess.Popen(
                cmd, shell=isinstance(cmd, str), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.alive():
            log(f"stop {self.name} (process group {self.popen.pid})")
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)  # the session leader's pid is the group id
            self.popen.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # whatever is left of the group
        self.popen.wait(5)

    def tail(self, lines: int = 25) -> str:
        return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants, from the parent ids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (those that are gone count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / TICKS


def machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq) / TICKS, steal / TICKS


class CpuMeter:
    """CPU used during one run by the load generator (this process), the upstream, the gateway, the rest."""

    def __init__(self, procs: dict[str, Proc]):
        self.wall0, self.self0 = time.monotonic(), time.process_time()
        self.busy0, self.steal0 = machine_cpu_s()
        self.pids = {name: tree_pids(p.popen.pid) for name, p in procs.items()}
        self.per_pid0 = {pid: cpu_s([pid]) for pids in self.pids.values() for pid in pids}

    def done(self) -> dict:
        wall = time.monotonic() - self.wall0
        used = {"loadgen": time.process_time() - self.self0}
        for name, pids in self.pids.items():
            used[name] = sum(cpu_s([pid]) - self.per_pid0[pid] for pid in pids)
        busy, steal = machine_cpu_s()
        other = max(0.0, busy - self.busy0 - sum(used.values()))
        result = {"wall_s": round(wall, 3), **{f"{n}_s": round(v, 3) for n, v in used.items()}}
        result.update(other_s=round(other, 3), other_cores=round(other / wall, 3))
        result["steal_cores"] = round((steal - self.steal0) / wall, 3)
        if "gateway" in self.pids:  # per process: how evenly the workers share the load
            split = [cpu_s([pid]) - self.per_pid0[pid] for pid in self.pids["gateway"]]
            result["gateway_procs_s"] = sorted((round(s, 3) for s in split if s >= 0.005), reverse=True)
        return result


def settle(procs: dict[str, Proc], max_s: float = 3.0) -> None:
    """Wait until our servers are idle, so work queued by one run does not leak into the next."""
    pids = [pid for p in procs.values() for pid in tree_pids(p.popen.pid)]
    deadline, last = time.monotonic() + max_s, cpu_s(pids)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = cpu_s(pids)
        if now - last < 0.01:
            return
        last = now


# ---------- set-up ----------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Far above what this benchmark sends (a few thousand requests/s, ~42 tokens each), so they never bind
# but the gateway still runs its per-key limit checks on every request, as in a real deployment.
GENEROUS_LIMITS = {"rpm": 10_000_000, "tpm": 1_000_000_000, "max_concurrent": 10_000}


def create_key(keys_db: Path) -> tuple[str, dict[str, int]]:
    """The one place the benchmark's key is made: with generous limits where the key store takes them.

    Both ``KeyStore.create(name, rpm=..., tpm=..., max_concurrent=...)`` and
    ``create(name, policy=KeyPolicy(rpm=..., ...))`` are understood; a store without limits gets a plain key.

    Returns:
        The key, and the limits it was given (empty when the store has none).
    """
    from serve.gateway import keys

    store = keys.KeyStore(keys_db)
    accepted = inspect.signature(store.create).parameters
    limits = {name: value for name, value in GENEROUS_LIMITS.items() if name in accepted}
    if limits:
        return store.create("gateway-bench", **limits), limits
    policy_class = getattr(keys, "KeyPolicy", None)
    if "policy" in accepted and policy_class is not None:
        fields = inspect.signature(policy_class).parameters
        limits = {name: value for name, value in GENEROUS_LIMITS.items() if name in fields}
        return store.create("gateway-bench", policy=policy_class(**limits)), limits
    return store.create("gateway-bench"), {}


def start_upstream(tmp: Path) -> tuple[Proc, int]:
    script = Path(upstream_mod.__file__)
    proc = Proc(
        "upstream", [sys.executable, str(script), "--chunks", str(STREAM_CHUNKS)], tmp / "upstream.log"
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = re.search(r"^listening (\d+)$", proc.log_path.read_text(), re.M)
        if match:
            return proc, int(match.group(1))
        if not proc.alive():
            break
        time.sleep(0.05)
    raise RuntimeError(f"the fake upstream did not start:\n{proc.tail()}")


def gateway_python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def start_gateway(tmp: Path, upstream_port: int, workers: int, cmd: str | None) -> tuple[Proc, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIT_GATEWAY_")}  # ours alone count
    env.update(
        KIT_GATEWAY_UPSTREAM_URL=f"http://127.0.0.1:{upstream_port}",
        KIT_GATEWAY_PORT=str(port),
        KIT_GATEWAY_HOST="127.0.0.1",
        KIT_GATEWAY_WORKERS=str(workers),
        KIT_GATEWAY_KEYS_DB=str(tmp / "gateway.sqlite"),
    )
    argv = cmd or [gateway_python(), "-m", "serve.cli", "gateway"]
    return Proc("gateway", argv, tmp / "gateway.log", env=env), port


def call(port: int, method: str, path: str, body: bytes | None = None, key: str = "") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {})
    try:
        conn.request(method, path, body, headers)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def wait_ready(proc: Proc, port: int, timeout_s: float = 90) -> float:
    """Seconds until the gateway's /readyz answers 200 (its upstream healthy and listing the model)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if not proc.alive():
            raise RuntimeError(f"the gateway exited (code {proc.popen.returncode}):\n{proc.tail()}")
        try:
            if call(port, "GET", "/readyz")[0] == 200:
                return round(time.monotonic() - t0, 1)
        except OSError:
            pass
        # uvicorn restarts a worker that dies at import without ever exiting itself: fail fast instead.
        if "Traceback (most recent call last)" in proc.log_path.read_text(errors="replace"):
            time.sleep(1)
            raise RuntimeError(f"the gateway failed while starting:\n{proc.tail(40)}")
        time.sleep(0.25)
    raise RuntimeError(f"the gateway was not ready after {timeout_s:.0f} s:\n{proc.tail()}")


def request_body(stream: bool) -> bytes:
    body: dict = {
        "model": upstream_mod.MODEL,
        "messages": [{"role": "user", "content": "Say hello in a few words."}],
        "max_tokens": 64,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body).encode()


def verify(target: Target) -> None:
    """Raise unless ``target`` returns the upstream's completion, non-streamed and streamed."""
    expected = upstream_mod.expected_text(STREAM_CHUNKS)
    status, body = call(target.port, "POST", target.path, request_body(False), target.key)
    if status != 200:
        raise RuntimeError(f"{target.name}, non-stream: HTTP {status}: {body[:300]!r}")
    text = json.loads(body)["choices"][0]["message"]["content"]
    if text != expected:
        raise RuntimeError(f"{target.name}, non-stream: wrong text {text[:80]!r}")
    status, body = call(target.port, "POST", target.path, request_body(True), target.key)
    events = [line[5:].strip() for line in body.decode().splitlines() if line.startswith("data:")]
    if status != 200 or not events or events[-1] != "[DONE]":
        raise RuntimeError(f"{target.name}, stream: HTTP {status}, no [DONE]: {body[:300]!r}")
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    if text != expected or not any(c.get("usage") for c in chunks):
        raise RuntimeError(f"{target.name}, stream: wrong text {text[:80]!r} or no usage event")


# ---------- measuring ----------
def measure(target: Target, scenario: Scenario, duration_s: float, procs: dict[str, Proc]) -> dict:
    import uvloop

    meter = CpuMeter(procs)
    body = request_body(scenario.stream)
    result = uvloop.run(run_load(target, body, scenario.stream, scenario.clients, duration_s))
    result["cpu"] = meter.done()
    if result["requests"]:
        for name in (
            ("loadgen", "upstream", "gateway") if target.name == "gateway" else ("loadgen", "upstream")
        ):
            result[f"{name}_cpu_ms_per_req"] = round(result["cpu"][f"{name}_s"] * 1e3 / result["requests"], 4)
    return result


def noisy(run: dict) -> bool:
    return run["requests"] == 0 or run["cpu"]["other_cores"] > NOISY_OTHER_CORES


def run_rounds(
    targets: list[Target], procs: dict[str, Proc], rounds: int, duration_s: float
) -> tuple[list, list]:
    """Every scenario on every target, ``rounds`` times, order alternating per round; noisy runs rerun."""
    kept, discarded = [], []
    retries_left = 2 * rounds
    for r in range(rounds):
        order = targets if r % 2 == 0 else targets[::-1]
        for scenario in SCENARIOS:
            for target in order:
                settle(procs)
                run = measure(target, scenario, duration_s, procs)
                while noisy(run) and retries_left > 0:
                    retries_left -= 1
                    discarded.append({"round": r, "scenario": scenario.name, "target": target.name, **run})
                    others = run["cpu"]["other_cores"]
                    log(f"  rerun {scenario.name} {target.name}: other processes used {others} cores")
                    settle(procs)
                    run = measure(target, scenario, duration_s, procs)
                run = {
                    "round": r,
                    "scenario": scenario.name,
                    "target": target.name,
                    **run,
                    "noisy": noisy(run),
                }
                kept.append(run)
                figure = run["first_p50_ms" if scenario.stream else "total_p50_ms"]
                log(
                    f"  round {r + 1}/{rounds} {scenario.label:<24} {target.name:<8}"
                    f" {run['rps']:>9,.0f} req/s  p50 {figure} ms  errors {run['errors']}"
                    f"  other {run['cpu']['other_cores']} cores"
                )
    return kept, discarded


def summarize(runs: list[dict]) -> dict:
    """Per scenario and figure: medians, min..max, and added = median of the per-round differences."""
    summary: dict = {}
    for scenario in SCENARIOS:
        of = {
            t: [r for r in runs if r["scenario"] == scenario.name and r["target"] == t]
            for t in ("direct", "gateway")
        }
        row: dict = {}
        for metric in [*METRICS[scenario.stream], "errors"]:
            direct = [r[metric] for r in of["direct"] if r[metric] is not None]
            gateway = [r[metric] for r in of["gateway"] if r[metric] is not None]
            if not direct or not gateway:
                row[metric] = None
                continue
            by_round = {r["round"]: r[metric] for r in of["direct"]}
            added = [
                r[metric] - by_round[r["round"]]
                for r in of["gateway"]
                if by_round.get(r["round"]) is not None
            ]
            direct_median, gateway_median = statistics.median(direct), statistics.median(gateway)
            row[metric] = {
                "direct": direct_median,
                "gateway": gateway_median,
                "added": round(statistics.median(added), 4),
                "ratio": round(gateway_median / direct_median, 4) if direct_median else None,
                "direct_range": [min(direct), max(direct)],
                "gateway_range": [min(gateway), max(gateway)],
            }
        for name in ("gateway_cpu_ms_per_req", "loadgen_cpu_ms_per_req", "upstream_cpu_ms_per_req"):
            values = [r[name] for r in of["gateway" if name.startswith("gateway") else "direct"] if name in r]
            row[name] = statistics.median(values) if values else None
        both = of["direct"] + of["gateway"]
        row["other_cores"] = statistics.median(r["cpu"]["other_cores"] for r in both) if both else None
        row["noisy_runs"] = sum(r["noisy"] for r in both)
        summary[scenario.name] = row
    return summary


# ---------- report ----------
def loadgen_overhead(summary: dict) -> dict:
    """The measuring tools' own cost, from the direct runs (load generator + upstream, no gateway)."""
    return {
        "direct_c1_p50_ms": (summary["ns_c1"]["total_p50_ms"] or {}).get("direct"),
        "direct_c64_rps": (summary["ns_c64"]["rps"] or {}).get("direct"),
        "loadgen_cpu_ms_per_req": summary["ns_c64"]["loadgen_cpu_ms_per_req"],
        "upstream_cpu_ms_per_req": summary["ns_c64"]["upstream_cpu_ms_per_req"],
        "note": "direct = load generator + upstream + loopback: an upper bound on what the tools add",
    }


def _ms(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f} ms" if signed else f"{value:.2f} ms"


def render_table(result: dict) -> str:
    """The README block: headline figures (direct | through the gateway | added) and where they come from."""
    s, cfg, machine = result["summary"], result["config"], result["machine"]

    def row(label: str, scenario: str, metric: str) -> str:
        m = s[scenario][metric]
        if m is None:
            return f"| {label} | - | - | - |"
        if metric == "rps":
            return f"| {label} | {m['direct']:,.0f} | {m['gateway']:,.0f} | x{m['ratio']:.3f} |"
        return f"| {label} | {_ms(m['direct'])} | {_ms(m['gateway'])} | {_ms(m['added'], signed=True)} |"

    cpu = [s[name]["gateway_cpu_ms_per_req"] for name in ("ns_c64", "st_c16")]
    loadgen = s["ns_c64"]["loadgen_cpu_ms_per_req"]
    code = result["code"]
    dirty = code["uncommitted_serve"]
    commit = f"commit {code['commit']}"
    if dirty:
        commit += " + uncommitted " + (
            ", ".join(dirty) if len(dirty) <= 3 else f"changes in {len(dirty)} files of serve/"
        )
    if cfg["gateway_cmd"] != DEFAULT_GATEWAY_CMD:
        commit = f"gateway started by `{cfg['gateway_cmd']}`"
    lines = [
        "| figure | direct | through the gateway | added |",
        "|---|---|---|---|",
        row("non-stream, 1 client: p50 latency", "ns_c1", "total_p50_ms"),
        row("non-stream, 1 client: p99 latency", "ns_c1", "total_p99_ms"),
        row("non-stream, 64 clients: requests/s", "ns_c64", "rps"),
        row("stream, 1 client: TTFT p50", "st_c1", "first_p50_ms"),
        row("stream, 16 clients: TTFT p50 (queueing)", "st_c16", "first_p50_ms"),
        row("stream, 16 clients: streams/s", "st_c16", "rps"),
        f"| gateway CPU per request (64 clients) / per {STREAM_CHUNKS}-chunk stream (16) | | "
        + " / ".join("-" if c is None else f"{c:.2f} ms" for c in cpu)
        + " | |",
    ]
    caption = (
        f"{result['date']}, {commit}, {cfg['workers']} gateway workers; {machine['nproc']} x "
        f"{machine['cpu_model']} shared by load generator, upstream and gateway. Medians of "
        f"{cfg['rounds']} rounds x {cfg['duration_s']:g} s; added = median of the per-round differences. "
        f"Other processes used {machine['other_cores_median']:.2f} cores (median over runs; "
        f"{result['noisy_runs']} kept runs above {NOISY_OTHER_CORES}). Errors: {result['errors']['direct']} "
        f"direct, {result['errors']['gateway']} through the gateway. The direct column is load generator + "
        f"upstream + loopback together: the measuring tools' own cost "
        f"({'-' if loadgen is None else f'{loadgen * 1e3:.0f} us'} of load-generator CPU per request). "
        f"Every run: `bench/{result['file']}`."
    )
    lines += ["", textwrap.fill(caption, width=105, break_on_hyphens=False, break_long_words=False)]
    return "\n".join(lines)


def update_readme(readme: Path, table: str) -> None:
    """Replace what lies between the bench-gateway markers in ``readme`` with ``table``."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise RuntimeError(f"{readme} has no {README_START} ... {README_END} block to fill")
    write_text_atomic(readme, text[: start + len(README_START)] + "\n" + table + "\n" + text[end:])


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    return done.stdout.rstrip() if done.returncode == 0 else "unknown"


def machine_facts() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    versions = {}
    for package in ("uvicorn", "uvloop", "httptools", "starlette", "fastapi", "aiohttp"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    busy0, t0 = machine_cpu_s()[0], time.monotonic()
    self0 = time.process_time()
    time.sleep(1.0)
    other = machine_cpu_s()[0] - busy0 - (time.process_time() - self0)
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model.group(1).strip() if model else platform.processor() or "unknown",
        "mem_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_start": list(os.getloadavg()),
        "other_cores_before": round(max(0.0, other) / (time.monotonic() - t0), 3),
    }


# ---------- main ----------
def _raise_on_signal(signum: int, _frame: object) -> None:
    if signum == signal.SIGALRM:
        raise TimeoutError("the benchmark ran past its overall time limit")
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds x 3 s (about a minute)")
    parser.add_argument("--rounds", type=int, help="rounds per scenario and target (default 3)")
    parser.add_argument("--duration", type=float, help="seconds per measured run (default 10)")
    parser.add_argument("--workers", type=int, default=2, help="gateway worker processes (default 2)")
    parser.add_argument(
        "--gateway-cmd",
        help="shell command that starts another gateway in the foreground; it gets the same "
        "KIT_GATEWAY_* environment (upstream URL, host, port, workers, keys database)",
    )
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench", help="where gateway-<date>.json goes")
    parser.add_argument(
        "--readme", type=Path, default=ROOT / "README.md", help="README whose table is replaced"
    )
    parser.add_argument("--no-readme", action="store_true", help="write the JSON only")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be >= 1 and --duration > 0")
    return args


def measure_all(args: argparse.Namespace, warmup_s: float) -> dict:
    """Start the upstream and the gateway, check them, warm up, run the rounds; always stop both."""
    procs: dict[str, Proc] = {}
    with tempfile.TemporaryDirectory(prefix="kit-bench-gateway-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            procs["upstream"], upstream_port = start_upstream(tmp)
            key, limits = create_key(tmp / "gateway.sqlite")
            procs["gateway"], gateway_port = start_gateway(tmp, upstream_port, args.workers, args.gateway_cmd)
            ready_s = wait_ready(procs["gateway"], gateway_port)
            targets = [Target("direct", upstream_port), Target("gateway", gateway_port, key=key)]
            for target in targets:
                verify(target)
            log(f"gateway ready in {ready_s} s; both targets return the right text, streamed and not")
            for target in targets:  # fill connection pools and caches before anything is timed
                for scenario in (SCENARIOS[1], SCENARIOS[3]):
                    measure(target, scenario, warmup_s, procs)
            kept, discarded = run_rounds(targets, procs, args.rounds, args.duration)
        except BaseException:
            for proc in procs.values():
                log(f"{proc.name} log tail:\n{proc.tail()}")
            raise
        finally:
            for proc in reversed(procs.values()):
                proc.stop()
    return {"key_limits": limits, "gateway_ready_s": ready_s, "runs": kept, "discarded_runs": discarded}


def code_state() -> dict:
    """The commit measured, and the files under serve/ that differ from it (taken when the run starts)."""
    uncommitted = [line[3:] for line in git("status", "--porcelain", "--", "serve").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_serve": uncommitted}


def build_result(
    args: argparse.Namespace, warmup_s: float, started: datetime, code: dict, machine: dict, measured: dict
) -> dict:
    kept = measured["runs"]
    summary = summarize(kept)
    date = started.strftime("%Y-%m-%d")
    return {
        "schema": 1,
        "date": date,
        "file": f"gateway-{date}.json",
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code": code,
        "config": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": warmup_s,
            "workers": args.workers,
            "stream_chunks": STREAM_CHUNKS,
            "gateway_cmd": args.gateway_cmd or DEFAULT_GATEWAY_CMD,
            "key_limits": measured["key_limits"],
            "noisy_other_cores": NOISY_OTHER_CORES,
            "scenarios": {
                s.name: {"label": s.label, "stream": s.stream, "clients": s.clients} for s in SCENARIOS
            },
        },
        "machine": {
            **machine,
            "loadavg_end": list(os.getloadavg()),
            "other_cores_median": statistics.median(r["cpu"]["other_cores"] for r in kept),
        },
        "gateway_ready_s": measured["gateway_ready_s"],
        "noisy_runs": sum(r["noisy"] for r in kept),
        "errors": {t: sum(r["errors"] for r in kept if r["target"] == t) for t in ("direct", "gateway")},
        "loadgen_overhead": loadgen_overhead(summary),
        "summary": summary,
        "runs": kept,
        "discarded_runs": measured["discarded_runs"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warmup_s = min(2.0, args.duration / 2)
    runs = args.rounds * len(SCENARIOS) * 2
    signal.signal(signal.SIGTERM, _raise_on_signal)
    signal.signal(signal.SIGALRM, _raise_on_signal)
    signal.alarm(int(180 + 2 * (runs * (args.duration + 4) + 4 * warmup_s)))  # twice the plan + start-up
    try:
        started, code = datetime.now(UTC), code_state()
        machine = machine_facts()
        log(f"{machine['nproc']} x {machine['cpu_model']}; others use {machine['other_cores_before']} cores")
        measured = measure_all(args, warmup_s)
    finally:
        signal.alarm(0)
    result = build_result(args, warmup_s, started, code, machine, measured)
    out = unused_path(args.out_dir / result["file"])  # an earlier run of the same day stays
    result["file"] = out.name
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    table = render_table(result)
    if not args.no_readme:
        update_readme(args.readme, table)
    print(table)
    log(f"wrote {out}" + ("" if args.no_readme else f" and the table in {args.readme}"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, TimeoutError) as exc:  # a check failed; the message says what
        log(f"error: {exc}")
        sys.exit(1)
    except KeyboardInterrupt:
        log("interrupted; every process it started is stopped")
        sys.exit(130)
