"""``kit start | stop | status | logs`` without vLLM: stale PID files, process discovery, stop's clean-up,
start's refusal and failure paths, logs, GPU lines, CLI errors. Stand-in supervisors are small Python
scripts; the real stack is in tests/integration/test_service.py."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve import cli, service, service_logs, service_status
from serve import processes as procs
from serve.processes import SERVICE_ID_ENV
from serve.service import (
    LaunchSpec,
    ProcessRef,
    ServiceError,
    ServicePaths,
    ServiceRecord,
)
from tests.polling import wait_for


@pytest.fixture
def paths(tmp_path: Path) -> ServicePaths:
    return ServicePaths(tmp_path / "state")


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; their groups are killed afterwards whatever happened."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.kill()
        process.wait(10)


def spawn(
    spawned: list[subprocess.Popen[bytes]], code: str, marker: str | None = None
) -> subprocess.Popen[bytes]:
    """A Python process in a session of its own, marked as service ``marker`` when given."""
    env = {k: v for k, v in os.environ.items() if k != SERVICE_ID_ENV}
    if marker is not None:
        env[SERVICE_ID_ENV] = marker
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, start_new_session=True)
    spawned.append(process)
    wait_for(lambda: procs.read_process(process.pid) is not None)
    return process


SLEEPER = "import time; time.sleep(600)"
# Ignores SIGTERM (as a stuck engine core would) and starts a grandchild in its group with a clean
# environment: the grandchild carries no marker and must still be found through its process group.
STUBBORN = """
    import signal, subprocess, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    subprocess.Popen(["env", "-i", "sleep", "600"])
    time.sleep(600)
"""


# Stops on SIGTERM but leaves STUBBORN running in a session of its own (as vLLM's would be after a crash).
LEAVES_A_STUBBORN_CHILD = f"""
    import signal, subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", {textwrap.dedent(STUBBORN)!r}], start_new_session=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    time.sleep(600)
"""


def record_for(pid: int, service_id: str = "feedc0de", **changes: object) -> ServiceRecord:
    fields: dict[str, object] = {
        "service_id": service_id,
        "supervisor": ProcessRef.of(pid),
        "profile": "cpu-demo",
        "command": ["kit", "up", "cpu-demo"],
        "started_at": time.time() - 125,
        "gateway_url": "http://127.0.0.1:9",  # discard port: nothing answers
        "vllm_url": "http://127.0.0.1:9",
        "vllm_uds": None,
        "stop_timeout_s": 5.0,
    }
    return ServiceRecord(**{**fields, **changes})


def write(paths: ServicePaths, record: ServiceRecord) -> None:
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    paths.record.write_text(record.model_dump_json())


def gone_record(paths: ServicePaths, spawned: list[subprocess.Popen[bytes]], **changes: object) -> None:
    """A record whose supervisor has exited (a stale PID file)."""
    process = spawn(spawned, SLEEPER)
    record = record_for(process.pid, **changes)
    process.kill()
    process.wait()
    write(paths, record)


# ------------------------------------------------------------------------------------------- PID records


def test_a_recorded_pid_counts_only_while_the_same_process_runs(spawned):
    process = spawn(spawned, SLEEPER)
    ref = ProcessRef.of(process.pid)
    assert ref.find() is not None and ref.find().pid == process.pid

    reused = ref.model_copy(update={"start_ticks": ref.start_ticks - 1})  # same PID, another process
    assert reused.find() is None
    assert "now belongs to another process" in reused.why_stale()

    earlier_boot = ref.model_copy(update={"boot_id": "00000000-0000-0000-0000-000000000000"})
    assert earlier_boot.find() is None
    assert "earlier boot" in earlier_boot.why_stale()

    process.kill()
    process.wait()
    assert ref.find() is None
    assert ref.why_stale() == f"process {process.pid} has exited"


def test_a_zombie_is_not_running(spawned):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    spawned.append(process)
    wait_for(lambda: (info := procs.read_process(process.pid)) is None or not info.alive)
    ref = ProcessRef(pid=process.pid, start_ticks=0, boot_id=procs.boot_id())
    assert ref.find() is None  # exited, not yet reaped: counts as gone


def test_read_process_parses_a_command_name_with_spaces_and_parentheses(spawned, tmp_path):
    odd = tmp_path / "odd) name ("
    odd.symlink_to(sys.executable)
    process = subprocess.Popen([str(odd), "-c", SLEEPER], start_new_session=True)
    spawned.append(process)
    wait_for(lambda: procs.read_process(process.pid) is not None)
    info = procs.read_process(process.pid)
    assert info is not None and info.pgid == process.pid and info.ppid == os.getpid()


def test_the_services_processes_are_found_by_marker_and_by_process_group(spawned):
    ours = spawn(spawned, STUBBORN, marker="abc123")
    spawn(spawned, SLEEPER, marker="other")  # another service
    spawn(spawned, SLEEPER)  # unmarked
    wait_for(lambda: len(procs.service_processes("abc123")) == 2)  # python and its sleep
    found = procs.service_processes("abc123")
    assert {p.pgid for p in found} == {ours.pid}
    assert [p.marker for p in found].count(None) == 1, "the env -i grandchild, found by its group"


def test_record_missing_corrupt_or_foreign(paths):
    assert service.read_record(paths) is None
    paths.state_dir.mkdir(parents=True)
    paths.record.write_text("{not json")
    with pytest.raises(ServiceError, match=r"not a kit service record.*delete the file"):
        service.read_record(paths)
    paths.record.write_text('{"version": 1, "pid": 5}')
    with pytest.raises(ServiceError, match="not a kit service record"):
        service.read_record(paths)


def test_the_lock_admits_one_start_or_stop_at_a_time(paths):
    held = pytest.raises(ServiceError, match="another `kit start` or `kit stop`")
    with service.exclusive(paths), held, service.exclusive(paths, wait_s=0.3):
        pass
    with service.exclusive(paths, wait_s=0.3):
        pass  # free again


# ------------------------------------------------------------------------------------------------ status


def test_status_not_running_without_a_record(paths):
    out = io.StringIO()
    assert service_status.status(paths, out) == service_status.STATUS_NOT_RUNNING == 3
    assert "not running" in out.getvalue() and "make start" in out.getvalue()


def test_status_of_a_stale_record_is_not_running(paths, spawned):
    gone_record(paths, spawned)
    out = io.StringIO()
    assert service_status.status(paths, out) == 3
    assert "is stale" in out.getvalue() and "has exited" in out.getvalue()


def test_status_is_dead_when_the_supervisor_is_gone_but_processes_are_left(paths, spawned):
    gone_record(paths, spawned, service_id="leftover1")
    orphan = spawn(spawned, SLEEPER, marker="leftover1")
    out = io.StringIO()
    assert service_status.status(paths, out) == service_status.STATUS_DEAD == 1
    assert str(orphan.pid) in out.getvalue() and "make stop" in out.getvalue()


def test_status_of_a_running_service_lists_health_processes_gpu_and_logs(paths, spawned, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi
    supervisor = spawn(spawned, SLEEPER, marker="run1")
    write(paths, record_for(supervisor.pid, service_id="run1"))
    out = io.StringIO()
    assert service_status.status(paths, out, probe_timeout_s=1) == service_status.STATUS_RUNNING == 0
    text = out.getvalue()
    assert "running, not ready" in text and "profile cpu-demo" in text and "up 2 min" in text
    assert "/health no answer" in text and "/readyz no answer" in text
    assert "models    unknown (vLLM down)" in text
    assert "GPU       no GPU (nvidia-smi not found)" in text
    assert f"{supervisor.pid} supervisor" in text
    assert str(paths.log("vllm")) in text


def test_gpu_lines_from_nvidia_smi_and_the_services_share(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        '  --query-gpu=*) echo "0, NVIDIA H200, 120000, 143771" ;;\n'
        '  --query-compute-apps=*) printf "4242, 100000\\n999, 5\\n" ;;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    assert service_status.gpu_lines({4242}) == [
        "GPU 0 NVIDIA H200: 120000 / 143771 MiB used",
        "held by the service's processes: 100000 MiB",
    ]
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert service_status.gpu_lines(set())[0].startswith("no GPU (nvidia-smi failed")


# -------------------------------------------------------------------------------------------------- stop


def test_stop_without_a_record_says_not_running(paths):
    out = io.StringIO()
    assert service.stop(paths, out) == 0
    assert "not running" in out.getvalue()


def test_stop_removes_a_stale_record(paths, spawned):
    gone_record(paths, spawned)
    assert service.stop(paths, io.StringIO()) == 0
    assert not paths.record.exists()


def test_stop_drains_through_the_supervisor_then_kills_what_it_left(paths, spawned):
    # The supervisor stops on SIGTERM but leaves, in a session of its own, a process that ignores
    # SIGTERM with an unmarked grandchild (an orphaned engine core, as after a crash).
    supervisor = spawn(spawned, LEAVES_A_STUBBORN_CHILD, marker="drain1")
    wait_for(lambda: len(procs.service_processes("drain1")) == 3)
    left_behind = [p.pid for p in procs.service_processes("drain1") if p.pid != supervisor.pid]
    write(paths, record_for(supervisor.pid, service_id="drain1"))
    out = io.StringIO()
    assert service.stop(paths, out) == 0, out.getvalue()
    text = out.getvalue()
    assert "the supervisor stopped after" in text
    assert "killing 2 left-over processes" in text
    assert procs.service_processes("drain1") == []
    assert all((info := procs.read_process(pid)) is None or not info.alive for pid in left_behind), (
        "a process of the service outlived stop"
    )
    assert not paths.record.exists()


def test_stop_kills_a_supervisor_that_ignores_sigterm(paths, spawned):
    supervisor = spawn(spawned, STUBBORN, marker="deaf1")
    wait_for(lambda: len(procs.service_processes("deaf1")) == 2)  # SIGTERM ignored from here on
    write(paths, record_for(supervisor.pid, service_id="deaf1", stop_timeout_s=0.5))
    out = io.StringIO()
    assert service.stop(paths, out) == 0
    assert "did not stop within" in out.getvalue() and "killing it" in out.getvalue()
    assert procs.service_processes("deaf1") == []


def test_stop_of_a_dead_service_ends_its_leftovers(paths, spawned):
    gone_record(paths, spawned, service_id="dead2")
    spawn(spawned, STUBBORN, marker="dead2")
    wait_for(lambda: len(procs.service_processes("dead2")) == 2)
    out = io.StringIO()
    assert service.stop(paths, out) == 0
    assert "the supervisor is gone" in out.getvalue()
    assert procs.service_processes("dead2") == []


# ------------------------------------------------------------------------------------------------- start


def spec(code: str, ready_timeout_s: float = 30) -> LaunchSpec:
    return LaunchSpec(
        command=[sys.executable, "-c", textwrap.dedent(code)],
        profile="cpu-demo",
        gateway_url="http://127.0.0.1:9",
        vllm_url="http://127.0.0.1:9",
        vllm_uds=None,
        gateway_drain_s=1,
        vllm_drain_s=1,
        ready_timeout_s=ready_timeout_s,
    )


READY_SUPERVISOR = """
    import signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("starting vLLM", flush=True)
    time.sleep(0.3)
    print("ready: models ['m'] at http://127.0.0.1:9/v1", flush=True)
    time.sleep(600)
"""


def test_start_waits_for_ready_refuses_a_second_start_and_stop_ends_it(paths):
    out = io.StringIO()
    try:
        assert service.start(paths, spec(READY_SUPERVISOR), out, poll_s=0.1) == 0, out.getvalue()
        assert "starting vLLM" in out.getvalue() and "running in the background" in out.getvalue()
        record = service.read_record(paths)
        assert record is not None and record.supervisor.find() is not None
        info = record.supervisor.find()
        assert info is not None and info.sid == info.pid == info.pgid, "not in a session of its own"
        assert record.stop_timeout_s == 15 + 15 + 15
        assert "==== kit start" in paths.log("service").read_text()
        with pytest.raises(ServiceError, match=r"already running.*make stop"):
            service.start(paths, spec(READY_SUPERVISOR), io.StringIO())
    finally:
        assert service.stop(paths, io.StringIO()) == 0
    assert procs.service_processes(record.service_id) == []
    assert not paths.record.exists()


def test_start_reports_a_supervisor_that_fails_and_keeps_no_record(paths):
    out = io.StringIO()
    failing = "import sys; print('error: no such profile: nope', flush=True); sys.exit(2)"
    assert service.start(paths, spec(failing), out, poll_s=0.1) == 2
    assert "error: no such profile: nope" in out.getvalue()
    assert "stopped before it was ready" in out.getvalue()
    assert not paths.record.exists()


def test_start_stops_a_supervisor_that_is_never_ready(paths):
    out = io.StringIO()
    silent = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); time.sleep(600)"
    )
    assert service.start(paths, spec(silent, ready_timeout_s=0.5), out, poll_s=0.1) == 1
    assert "not ready after" in out.getvalue() and "no process of the service is left" in out.getvalue()
    assert not paths.record.exists()


def test_start_replaces_a_stale_record_but_not_one_with_processes_left(paths, spawned):
    gone_record(paths, spawned, service_id="old1")
    orphan = spawn(spawned, SLEEPER, marker="old1")
    with pytest.raises(ServiceError, match=r"processes are left.*make stop"):
        service.start(paths, spec(READY_SUPERVISOR), io.StringIO())
    orphan.kill()
    orphan.wait()
    out = io.StringIO()
    try:
        assert service.start(paths, spec(READY_SUPERVISOR), out, poll_s=0.1) == 0
        assert "removed a stale" in out.getvalue()
    finally:
        service.stop(paths, io.StringIO())


# -------------------------------------------------------------------------------------------------- logs


def test_tail_lines_reads_from_the_end_across_blocks(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(1000)))
    assert service_logs.tail_lines(log, 3, block=7) == ["line 997", "line 998", "line 999"]
    assert service_logs.tail_lines(log, 0) == []
    assert len(service_logs.tail_lines(log, 5000)) == 1000
    (tmp_path / "empty.log").write_text("")
    assert service_logs.tail_lines(tmp_path / "empty.log", 5) == []


def test_follow_logs_yields_whole_appended_lines_and_survives_truncation(paths):
    paths.log_dir.mkdir(parents=True)
    vllm = paths.log("vllm")
    vllm.write_text("old\n")
    files = service_logs.log_paths(paths, "all")
    looks = iter(range(6))
    chunks = service_logs.follow_logs(files, poll_s=0, keep_going=lambda: next(looks, None) is not None)
    with vllm.open("a") as handle:
        handle.write("new 1\npartial")
    assert next(chunks) == (vllm, "new 1\n")
    vllm.write_text("cut\n")  # truncated, shorter than what was read: followed from its new end
    paths.log("gateway").write_text("gateway appeared\n")
    assert list(chunks) == [(paths.log("gateway"), "gateway appeared\n")]


def test_show_logs_with_none_yet_or_an_unknown_name(paths):
    with pytest.raises(ServiceError, match=r"no logs yet.*make start"):
        service_logs.show_logs(paths, "all", 10, io.StringIO())
    with pytest.raises(ServiceError, match="no log named 'engine'"):
        service_logs.log_paths(paths, "engine")


# --------------------------------------------------------------------------------------------------- CLI


def run_kit(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_status_stop_and_logs_on_an_empty_folder(tmp_path, capsys):
    root = str(tmp_path)
    assert run_kit(capsys, "--root", root, "status")[0] == 3
    assert run_kit(capsys, "--root", root, "stop")[0] == 0
    code, _, err = run_kit(capsys, "--root", root, "logs")
    assert code == 1 and "no logs yet" in err and "Traceback" not in err


def test_cli_logs_prints_the_last_lines_of_each_log(tmp_path, capsys):
    logs = tmp_path / "state" / "logs"
    logs.mkdir(parents=True)
    (logs / "vllm.log").write_text("a\nb\nc\n")
    (logs / "gateway.log").write_text("g\n")
    code, out, _ = run_kit(capsys, "--root", str(tmp_path), "logs", "-n", "2")
    assert code == 0
    assert out == f"==> {logs / 'vllm.log'} <==\nb\nc\n==> {logs / 'gateway.log'} <==\ng\n"
    code, out, _ = run_kit(capsys, "--root", str(tmp_path), "logs", "vllm", "-n", "1")
    assert (code, out) == (0, "c\n")


@pytest.mark.parametrize("argv", [["logs", "-n", "-1"], ["logs", "-n", "many"], ["logs", "engine"]])
def test_cli_logs_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_cli_start_refuses_a_bad_profile_or_set_before_anything_detaches(root, capsys):
    code, _, err = run_kit(capsys, "--root", str(root), "start", "no-such-profile")
    assert code == 2 and "no-such-profile" in err
    code, _, err = run_kit(capsys, "--root", str(root), "start", "cpu-demo", "--set", "vllm.port")
    assert code == 2 and "expected KEY=VALUE" in err


def test_local_url_names_loopback_for_wildcard_binds():
    assert cli._local_url("0.0.0.0", 8080, False) == "http://127.0.0.1:8080"
    assert cli._local_url("::", 8443, True) == "https://[::1]:8443"
    assert cli._local_url("10.0.0.5", 80, False) == "http://10.0.0.5:80"


def test_cli_explains_a_state_folder_it_cannot_use(root, tmp_path, capsys):
    kit_root = tmp_path / "kit"
    kit_root.mkdir()
    (kit_root / "configs").symlink_to(root / "configs")
    (kit_root / "models").symlink_to(root / "models")
    (kit_root / "state").write_text("a file where the state folder belongs")
    for argv in (["start", "cpu-demo"], ["stop"], ["status"], ["logs"]):
        code, _, err = run_kit(capsys, "--root", str(kit_root), *argv)
        assert code in {1, 3} and "Traceback" not in err, (argv, err)
        if argv[0] in {"start", "stop", "status"}:
            assert "state" in err and "error:" in err, (argv, err)
