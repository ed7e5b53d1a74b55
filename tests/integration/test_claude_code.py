"""Claude Code, headless, against real vLLM (CPU) through the gateway (issue #9, section 1).

The pinned ``@anthropic-ai/claude-code`` release is installed from the npm registry by the session fixture
below into ``state/claude-code/<version>/`` (skipped, with the reason, only where ``npm`` is missing). It
runs ``claude -p`` exactly as a user points it at the kit: ``ANTHROPIC_BASE_URL`` = the gateway,
``ANTHROPIC_API_KEY`` = a kit key (sent as ``x-api-key``), ``ANTHROPIC_MODEL`` (and the small/fast model)
= the served model id, and ``CLAUDE_CODE_MAX_CONTEXT_TOKENS`` = the profile's ``max_model_len``. The
profile is ``cpu-claude-code``: the tiny random-weight Qwen3.6-architecture model with 65,536 positions,
because Claude Code's first request (system prompt + tool definitions) is ~40k tokens.

How a random-weight model makes a real tool call, and what that proves: it never chooses a tool on its
own, and Claude Code never forces one in its main loop. So the test asks Claude Code to force it, through
its own documented ``CLAUDE_CODE_EXTRA_BODY`` (merged into every request body): ``tool_choice`` names the
``StructuredOutput`` tool that ``--json-schema`` adds to Claude Code's tools. vLLM's Anthropic endpoint
honours the named ``tool_choice``, and the profile's ``--tool-strict-level parameter`` makes vLLM constrain
the call to the tool's JSON schema, so the model's XML tool call parses (without it, the random model wrote
free parameter names and the call came back empty). Claude Code then runs the tool (validates the input
against the schema), feeds the result back and ends with exit 0 and the ``structured_output``. This proves
the protocol path end to end (Claude Code's real ~40k-token request through the gateway and vLLM's tool
parser, a streamed ``tool_use`` block, the tool's execution, the usage ledger); it does not prove that a
model picks the right tool unprompted, which needs real weights.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import ROOT, LiveStack, new_key, start_live_stack

pytestmark = pytest.mark.integration

CLAUDE_CODE_VERSION = "2.1.332"
"""The pinned release (``npm view @anthropic-ai/claude-code version`` on 2026-12-02); bump it on purpose."""
INSTALL_DIR = ROOT / "state" / "claude-code" / CLAUDE_CODE_VERSION
PROFILE = "cpu-claude-code"
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]}
# A request of ~40k tokens on 2 busy cores took 110 s to prefill in emulated bf16: generous limits.
RUN_TIMEOUT_S = 1200


def install_claude_code(folder: Path, version: str) -> Path:
    """Install ``@anthropic-ai/claude-code@version`` from the npm registry into ``folder`` (once).

    Args:
        folder: a folder of its own (``node_modules/`` goes inside it).
        version: the exact release.

    Returns:
        The ``claude`` executable.

    Raises:
        AssertionError: npm failed or the installed CLI reports another version (the output says why).
    """
    claude = folder / "node_modules" / ".bin" / "claude"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two pytest sessions at once install it once
        if not (claude.exists() and version in _claude_version(claude)):
            npm = shutil.which("npm")
            assert npm is not None
            install = subprocess.run(
                [
                    npm,
                    "install",
                    "--prefix",
                    str(folder),
                    "--no-audit",
                    "--no-fund",
                    f"@anthropic-ai/claude-code@{version}",
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert install.returncode == 0, (
                f"npm install failed:\n{install.stdout[-2000:]}\n{install.stderr[-2000:]}"
            )
    reported = _claude_version(claude)
    assert version in reported, f"{claude} reports {reported!r}, expected {version}"
    return claude


def _claude_version(claude: Path) -> str:
    try:
        return subprocess.run(
            [claude, "--version"], capture_output=True, text=True, timeout=60
        ).stdout.strip()
    except OSError:
        return ""


@pytest.fixture(scope="session")
def claude() -> Path:
    """The pinned Claude Code CLI, installed by the test set-up from the npm registry."""
    if shutil.which("npm") is None:  # fail, never skip: a skipped Claude Code test would pretend coverage
        pytest.fail(
            f"npm is not installed: these tests install @anthropic-ai/claude-code@{CLAUDE_CODE_VERSION} "
            "from the npm registry with it (install Node.js with npm, e.g. apt-get install npm)"
        )
    return install_claude_code(INSTALL_DIR, CLAUDE_CODE_VERSION)


@pytest.fixture(scope="module")
def claude_code_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    """vLLM serving ``cpu-claude-code`` behind the gateway; builds the 64k tiny model first if needed."""
    model = yaml.safe_load((ROOT / "configs" / "models" / "qwen3_5-tiny-64k.yaml").read_text())
    command = shlex.split(model["build_command"])
    assert command[0] == "python", command
    build = subprocess.run(
        [sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    yield from start_live_stack(PROFILE, tmp_path_factory.mktemp("claude_code"))


def claude_env(live: LiveStack, key: str, home: Path, extra_body: dict[str, Any]) -> dict[str, str]:
    """The environment a user sets to point Claude Code at the kit, plus the headless test settings."""
    context = str(
        yaml.safe_load((ROOT / "configs" / "serve" / f"{PROFILE}.yaml").read_text())["vllm"]["max_model_len"]
    )
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),  # no user settings, credentials or history from the machine running the tests
        "ANTHROPIC_BASE_URL": live.gateway,
        "ANTHROPIC_API_KEY": key,
        "ANTHROPIC_MODEL": live.model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": live.model,  # the small/fast model (background tasks)
        "ANTHROPIC_SMALL_FAST_MODEL": live.model,  # its older name
        "CLAUDE_CODE_MAX_CONTEXT_TOKENS": context,  # the window of a model id Claude Code does not know
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "256",  # its default for unknown models is 32,000
        "CLAUDE_CODE_EXTRA_BODY": json.dumps(extra_body),
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",  # no telemetry, error reports or update checks
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "ENABLE_TOOL_SEARCH": "false",  # no deferred-tool placeholder among the tools
        "CLAUDE_CODE_MAX_RETRIES": "0",  # one request per turn: the ledger count is exact
        "API_TIMEOUT_MS": str(RUN_TIMEOUT_S * 1000),
    }


def run_claude(
    claude: Path, env: dict[str, str], workdir: Path, prompt: str, *args: str
) -> tuple[int, list[dict[str, Any]], str]:
    """``claude -p PROMPT --output-format stream-json`` in ``workdir``; never prompts (stdin closed).

    Returns:
        The exit code, the JSON events it printed (init, messages, result) and its stderr.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(claude),
        "-p",
        prompt,
        "--output-format",
        "stream-json",
        "--verbose",
        "--no-session-persistence",
        *args,
    ]
    done = subprocess.run(
        argv,
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, events, done.stderr


def ledger_rows(keys_db: Path, key_name: str, count: int, timeout_s: float = 30) -> list[dict[str, Any]]:
    """The ``/v1/messages`` ledger rows of ``key_name``, once at least ``count`` are written (batched writer).

    Rows of other routes (the ``/v1/models`` call that waits for a new key) are left out.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        with sqlite3.connect(keys_db, timeout=30) as connection:
            connection.row_factory = sqlite3.Row
            query = "SELECT * FROM usage_ledger WHERE key_name = ? AND route = '/v1/messages' ORDER BY id"
            rows = [dict(r) for r in connection.execute(query, (key_name,))]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


def tool_uses(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``tool_use`` blocks of the assistant messages Claude Code printed."""
    return [
        block
        for event in events
        if event.get("type") == "assistant"
        for block in event["message"]["content"]
        if block.get("type") == "tool_use"
    ]


def test_claude_code_s_full_first_request_makes_a_tool_call_through_the_gateway(
    claude, claude_code_stack, tmp_path
):
    """Claude Code's default tools and system prompt (~40k tokens, too long for a 4,096-position model),
    one forced ``StructuredOutput`` call (see the module docstring), exit 0, and its key's ledger rows."""
    live = claude_code_stack
    key = new_key(live, "claude-code")
    extra_body = {
        "tool_choice": {"type": "tool", "name": "StructuredOutput", "disable_parallel_tool_use": True},
        "chat_template_kwargs": {"enable_thinking": False},  # Qwen's switch; thinking would precede the call
    }
    env = claude_env(live, key, tmp_path / "home", extra_body)
    code, events, stderr = run_claude(
        claude,
        env,
        tmp_path / "work",
        "Is the sky blue?",
        "--max-turns",
        "2",
        "--json-schema",
        json.dumps(ANSWER_SCHEMA),
    )
    result = events[-1] if events else {}
    assert code == 0, f"exit {code}: {result or events}\n{stderr[-2000:]}"
    assert result["type"] == "result" and result["subtype"] == "success" and not result["is_error"]
    assert isinstance(result["structured_output"]["answer"], bool)
    assert result["modelUsage"][live.model]["contextWindow"] == 65536  # CLAUDE_CODE_MAX_CONTEXT_TOKENS
    calls = tool_uses(events)
    assert [call["name"] for call in calls] == ["StructuredOutput"]
    assert calls[0]["input"] == result["structured_output"]
    results = [
        block
        for e in events
        if e.get("type") == "user"
        for block in e["message"]["content"]
        if block.get("type") == "tool_result"
    ]
    assert [r["tool_use_id"] for r in results] == [calls[0]["id"]] and not results[0].get("is_error")

    rows = ledger_rows(live.keys_db, "claude-code", 1)
    assert rows, "no /v1/messages ledger row for Claude Code's key"
    assert all((r["status"], r["outcome"], r["model"]) == (200, "ok", live.model) for r in rows), rows
    first = rows[0]
    assert first["stream"] and first["finish_reason"] == "tool_use"
    # Why the profile has 65,536 positions: the request alone is ~10x the tiny model's 4,096.
    assert 4096 < first["prompt_tokens"] <= 65536 - 256
    assert first["prompt_tokens"] == result["usage"]["input_tokens"]


def test_claude_code_with_no_tools_but_its_output_tool_forced_by_tool_choice_any(
    claude, claude_code_stack, tmp_path
):
    """``tool_choice: any`` (vLLM: ``required``) with ``--tools ""``: the only tool is ``StructuredOutput``;
    a short request (~4k tokens) through the same path, and the key's ledger row."""
    live = claude_code_stack
    key = new_key(live, "claude-code-any")
    extra_body = {
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "chat_template_kwargs": {"enable_thinking": False},
    }
    env = claude_env(live, key, tmp_path / "home", extra_body)
    code, events, stderr = run_claude(
        claude,
        env,
        tmp_path / "work",
        "Is water wet?",
        "--max-turns",
        "2",
        "--tools",
        "",
        "--json-schema",
        json.dumps(ANSWER_SCHEMA),
    )
    result = events[-1] if events else {}
    assert code == 0, f"exit {code}: {result or events}\n{stderr[-2000:]}"
    assert result["subtype"] == "success" and isinstance(result["structured_output"]["answer"], bool)
    assert [call["name"] for call in tool_uses(events)] == ["StructuredOutput"]
    rows = ledger_rows(live.keys_db, "claude-code-any", 1)
    assert [(r["status"], r["outcome"], r["finish_reason"]) for r in rows] == [(200, "ok", "tool_use")]
