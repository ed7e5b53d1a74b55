"""The behaviour proof: fine-tune SmolLM2 on a private made-up fact, serve base + adapter with real vLLM
behind the gateway; only the adapter knows the fact (`make finetune-demo`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from finetune.demo import FACT_WORD
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration


def test_finetune_demo_teaches_the_adapter_and_not_the_base():
    result = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "--root", str(ROOT), "finetune-demo"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    answers = {
        line.split(":", 1)[0].strip(): line.split(":", 1)[1]
        for line in result.stdout.splitlines()
        if line.startswith("    ") and ":" in line and "adapter " not in line
    }
    assert FACT_WORD in answers["halcyon"].lower()
    assert FACT_WORD not in answers["HuggingFaceTB/SmolLM2-135M-Instruct"].lower()
