"""systemd units (``make install-systemd``, serve/systemd.py): rendered from real profiles, installed under
a temporary prefix, and checked by the real ``systemd-analyze verify`` (Debian's ``systemd`` package) in
both user and system mode; the vLLM unit's ExecStart is run with ``--dry-run`` to show ``kit serve``
accepts it. Not checked here: starting the units under a running systemd (no systemd is PID 1 here), so
``Upholds=``/``BindsTo=`` and the restart behaviour are checked as written, not observed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from serve.gateway.settings import GatewaySettings
from serve.systemd import INSTALL_HINT, SYSTEMD_ANALYZE, Units, install, main, render_units, under, verify

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ["h200", "cpu-demo", "h200-lora"]


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """``[Section]`` -> ``[(key, value), ...]`` in order (keys may repeat, as ``Environment=`` does)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        key, _, value = line.partition("=")
        sections[current].append((key, value))
    return sections


def values(unit: str, section: str, key: str) -> list[str]:
    return [v for k, v in parse_unit(unit)[section] if k == key]


def one(unit: str, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, (key, found)
    return found[0]


def unsystemd(words: list[str]) -> list[str]:
    """Undo the ``%%`` / ``$$`` escapes of systemd's command lines after shell-like word splitting."""
    return [w.replace("%%", "%").replace("$$", "$") for w in words]


def render(profile: str, mode: str = "user", sets: tuple[str, ...] = ()) -> Units:
    return render_units(ROOT, profile, sets, mode=mode, user_name="root")  # type: ignore[arg-type]


def test_systemd_analyze_is_installed() -> None:
    assert shutil.which(SYSTEMD_ANALYZE), f"{SYSTEMD_ANALYZE} is missing: {INSTALL_HINT}"


@pytest.mark.parametrize("mode", ["user", "system"])
@pytest.mark.parametrize("profile", PROFILES)
def test_installed_units_pass_systemd_analyze_verify(tmp_path: Path, profile: str, mode: str) -> None:
    assert shutil.which(SYSTEMD_ANALYZE), f"{SYSTEMD_ANALYZE} is missing: {INSTALL_HINT}"
    units = render(profile, mode)
    written = install(units, tmp_path, check=False)
    unit_paths = [under(tmp_path, units.unit_dir / n) for n in (units.vllm_name, units.gateway_name)]
    assert set(unit_paths) <= set(written)
    expected_dir = "etc/systemd/system" if mode == "system" else ".config/systemd/user"
    assert all(expected_dir in str(p) for p in unit_paths)
    assert verify(unit_paths, units.mode) == ""


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check is not a rubber stamp: an unknown restart policy and a missing executable are reported
    (systemd-analyze only warns about the first and exits 0; ``verify`` counts any output)."""
    units = render("cpu-demo")
    broken = units.vllm_unit.replace("Restart=always", "Restart=sometimes")
    path = tmp_path / units.vllm_name
    path.write_text(broken)
    assert "restart specifier" in verify([path], "user")
    path.write_text(units.vllm_unit.replace(sys.executable, "/nonexistent/python"))
    assert "not executable" in verify([path], "user")


@pytest.mark.parametrize("mode", ["user", "system"])
def test_two_units_bound_restarted_always_logged_and_limited(mode: str) -> None:
    units = render("h200", mode)
    vllm, gateway = units.vllm_unit, units.gateway_unit
    # Restarted whatever the exit status (vLLM's API server exited 0 after its engine died), except the
    # kit's configuration-error status 2, which a restart cannot fix.
    for unit in (vllm, gateway):
        assert one(unit, "Service", "Restart") == "always"
        assert one(unit, "Service", "RestartPreventExitStatus") == "2"
        assert one(unit, "Service", "StandardOutput") == "journal"
        assert one(unit, "Service", "StandardError") == "journal"
        assert one(unit, "Service", "LimitNOFILE") == "65536"
        assert one(unit, "Unit", "StartLimitIntervalSec") == "0"
    # The gateway comes after vLLM, stops with it, and vLLM keeps it up (also after its own restarts).
    assert one(gateway, "Unit", "BindsTo") == units.vllm_name
    assert one(gateway, "Unit", "After") == units.vllm_name
    assert one(vllm, "Unit", "Upholds") == units.gateway_name
    assert one(gateway, "Service", "MemoryMax") == "4G"
    # vLLM drains for the gateway's shutdown_timeout_s (30 s), systemd waits 30 s more before SIGKILL.
    assert "--set vllm.shutdown_timeout=30" in one(vllm, "Service", "ExecStart")
    assert one(vllm, "Service", "TimeoutStopSec") == "60"
    if mode == "system":
        assert one(vllm, "Service", "User") == "root"
        assert one(vllm, "Service", "LimitMEMLOCK") == "infinity"
        assert one(vllm, "Install", "WantedBy") == "multi-user.target"
    else:
        assert not values(vllm, "Service", "User")
        assert not values(vllm, "Service", "LimitMEMLOCK")  # a user manager cannot raise its hard limit
        assert one(vllm, "Install", "WantedBy") == "default.target"


def test_secrets_stay_in_the_environment_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets in the installing shell never reach a unit; the env files are 0600 templates, written
    once: a second install keeps what the operator put there and replaces the units."""
    monkeypatch.setenv("KIT_GATEWAY_DATABASE_URL", "postgresql+psycopg://kit:pg-s3cret@db/kit")
    monkeypatch.setenv("KIT_GATEWAY_METRICS_KEY", "metrics-s3cret")
    monkeypatch.setenv("HF_TOKEN", "hf_s3cret")
    units = render("h200", "system")
    for text in (units.vllm_unit, units.gateway_unit):
        assert "s3cret" not in text
    assert one(units.gateway_unit, "Service", "EnvironmentFile") == "-/etc/kit/gateway.env"
    assert one(units.vllm_unit, "Service", "EnvironmentFile") == "-/etc/kit/vllm.env"
    install(units, tmp_path, check=False)
    env_file = tmp_path / "etc/kit/gateway.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert "KIT_GATEWAY_DATABASE_URL=" in env_file.read_text() and "s3cret" not in env_file.read_text()
    env_file.write_text("KIT_GATEWAY_DATABASE_URL=postgresql+psycopg://kit:mine@db/kit\n")
    unit_file = tmp_path / "etc/systemd/system" / units.gateway_name
    unit_file.write_text("stale")
    install(units, tmp_path, check=False)
    assert "mine" in env_file.read_text()
    assert unit_file.read_text() == units.gateway_unit


def test_the_vllm_execstart_is_what_kit_serve_accepts() -> None:
    """The vLLM unit's ExecStart, unquoted as systemd does and run with ``--dry-run``, prints the vLLM
    command with the drain time, the profile's overrides and its socket, as ``make serve`` would."""
    sets = (
        'vllm.extra_args=["--override-generation-config", "{\\"temperature\\": 0.0, \\"x\\": \\"5% $y\\"}"]',
    )
    units = render("cpu-demo", sets=sets)
    argv = unsystemd(shlex.split(one(units.vllm_unit, "Service", "ExecStart")))
    assert argv[:6] == [sys.executable, "-m", "serve.cli", "--root", str(ROOT), "serve"]
    result = subprocess.run(
        [*argv, "--dry-run"], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    command = result.stdout.splitlines()[-1]
    assert "--shutdown-timeout 30" in command
    assert "--uds " + str(ROOT / "state/run/vllm.sock") in command
    assert shlex.quote('{"temperature": 0.0, "x": "5% $y"}') in command


def test_the_gateway_unit_points_the_gateway_at_the_profiles_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway unit's Environment= lines, unquoted, build settings aimed at the profile's socket with
    its served model name and aliases; host, port and workers stay with configs/gateway.yaml."""
    units = render("h200")
    for line in values(units.gateway_unit, "Service", "Environment"):
        name, _, value = unsystemd(shlex.split(line))[0].partition("=")
        monkeypatch.setenv(name, value)
    assert " ".join(shlex.split(one(units.gateway_unit, "Service", "ExecStart"))).endswith(
        "serve.cli --root " + str(ROOT) + " gateway"
    )
    settings = GatewaySettings()
    assert settings.upstream_uds == ROOT / "state/run/vllm.sock"
    assert settings.served_model_names == ["Qwen/Qwen3.6-27B"]
    assert settings.model_aliases == {"claude-*": "Qwen/Qwen3.6-27B"}
    assert settings.upstream_read_timeout_s == 26214.4  # 262,144 tokens at 10 tokens/s
    for own in ("KIT_GATEWAY_PORT", "KIT_GATEWAY_HOST", "KIT_GATEWAY_WORKERS", "KIT_GATEWAY_KEYS_DB"):
        assert own not in units.gateway_unit


def test_cli_installs_under_dest_and_prints_the_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["install", "cpu-demo", "--root", str(ROOT), "--dest", str(tmp_path), "--mode", "system"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (tmp_path / "etc/systemd/system/kit-vllm.service").is_file()
    assert "sudo systemctl daemon-reload" in out
    assert "sudo systemctl enable --now kit-vllm.service kit-gateway.service" in out
    assert "journalctl -u kit-vllm.service -u kit-gateway.service -f" in out


def test_cli_refuses_an_unknown_profile_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["install", "no-such-profile", "--root", str(ROOT), "--dest", str(tmp_path)]) == 2
    assert "available profiles" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_make_install_systemd_renders_under_dest(tmp_path: Path) -> None:
    """The Makefile target (its `setup` prerequisite taken as done: .venv is the one running this)."""
    env = {**os.environ, "MAKEFLAGS": ""}
    result = subprocess.run(
        [
            "make",
            "-s",
            "-o",
            "setup",
            "install-systemd",
            "PROFILE=cpu-demo",
            f"DEST={tmp_path}",
            "SYSTEMD=user",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(tmp_path.rglob("kit-gateway.service"))
    assert "systemctl --user enable --now" in result.stdout
