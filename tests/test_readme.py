"""The README's quick start is exactly what we test (litgpt's test_readme habit)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the quick start has a bash block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_is_make_demo_then_make_test():
    assert quick_start_commands() == ["make demo", "make test"]


def test_ci_runs_the_readme_s_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text().splitlines()


def test_make_test_runs_pytest_after_setup_and_models():
    plan = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "scripts/setup.sh" in plan and "build_smollm2.py" in plan and "-m pytest" in plan


def test_a_second_setup_does_nothing():
    result = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "is up to date" in result.stdout


@pytest.mark.integration
def test_make_demo_streams_a_correct_answer():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    result = subprocess.run(["make", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    answer = result.stdout.split("A: ", 1)[1]
    assert "paris" in answer.lower()
    assert "demo ok" in result.stdout
