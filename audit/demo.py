"""``make audit-demo``: the whole audit against the embedded demo model, on this machine, in minutes.

Starts real vLLM for the ``cpu-demo`` profile (SmolLM2-135M-Instruct) and the real gateway with
``serve.supervisor.run_stack``, gives the gateway the counter-slant system-prompt policy
(``configs/audit/counter-slant-policy.yaml``), creates two keys (one plain, one carrying the policy), runs
a small subset through both, scores, writes the report, and stops both processes. The numbers mean nothing
for a 135M model; the demo shows the pipeline and the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from audit.pipeline import AuditOutcome, AuditSettings, load_policy, run_audit
from audit.runner import Sampling
from serve.config import ResolvedProfile, load_profile
from serve.configfile import ConfigError
from serve.gateway.keys import KeyPolicy, KeyStore
from serve.gateway.system_policy import SystemPolicy
from serve.modeldir import not_ready_reason
from serve.supervisor import Stack, run_stack

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
POLICY_FILE = ROOT / "configs" / "audit" / "counter-slant-policy.yaml"


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    """Set variables for the block (the gateway child inherits them), then restore the environment."""
    saved = {name: os.environ.get(name) for name in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclasses.dataclass
class DemoStack:
    """A running demo stack with its two keys: one plain, one whose requests get the policy."""

    stack: Stack
    baseline_key: str
    policy_key: str
    policy_id: str
    keys_db: Path


@contextlib.contextmanager
def demo_stack(
    workdir: Path, profile: str = "cpu-demo", policy_file: Path = POLICY_FILE
) -> Iterator[DemoStack]:
    """vLLM + gateway for ``profile`` with the policy configured, and the two keys.

    Keys, ledger and logs go to ``workdir``. vLLM's socket and its temporary files go to a short private
    folder under the system's temp dir, removed afterwards: a Unix socket path (vLLM's own and the ZMQ
    sockets of its engine) must stay under 108 bytes, which a deep ``workdir`` would exceed.

    Raises:
        ConfigError: the model is not built yet (``make models``), or the policy file is invalid.
        StartupError: vLLM or the gateway did not start (the message holds the end of its log).
    """
    policy_id, policy = load_policy(policy_file)
    short = Path(tempfile.mkdtemp(prefix="kit-audit-"))  # mode 0700, as vLLM's socket folder must be
    try:
        resolved = load_profile(ROOT, profile, {"vllm.uds": str(short / "run" / "vllm.sock")})
        reason = not_ready_reason(resolved)
        if reason:
            raise ConfigError([reason], hint="`make models` builds the embedded demo model")
        with _keys_and_stack(workdir, resolved, policy_id, policy, short) as demo:
            yield demo
    finally:
        shutil.rmtree(short, ignore_errors=True)


@contextlib.contextmanager
def _keys_and_stack(
    workdir: Path, resolved: ResolvedProfile, policy_id: str, policy: SystemPolicy, scratch: Path
) -> Iterator[DemoStack]:
    keys_db = workdir / "keys.sqlite"
    keys_db.unlink(missing_ok=True)  # fresh keys every run; the answers are what is resumed
    store = KeyStore(keys_db)
    baseline_key = store.create("audit-baseline")
    policy_key = store.create("audit-policy", KeyPolicy(system_policy=policy_id))
    # The gateway child reads its system_policies from the environment (KIT_GATEWAY_* over the YAML).
    env = {"KIT_GATEWAY_SYSTEM_POLICIES": json.dumps({policy_id: policy.model_dump()})}
    with (
        _environ(env),
        run_stack(resolved, keys_db=keys_db, log_dir=workdir / "logs", scratch=scratch / "scratch") as stack,
    ):
        yield DemoStack(stack, baseline_key, policy_key, policy_id, keys_db)


def run_demo(
    out: Path,
    subset: str = "demo",
    max_tokens: int = 48,
    concurrency: int = 8,
    client_policy: bool = False,
    reps: int = 1000,
) -> AuditOutcome:
    """Start the demo stack, audit ``subset`` through both keys, report, stop.

    Args:
        out: the audit's output folder (answers are resumed from it; the stack's logs go to
            ``out/stack``).
        subset: a subset of configs/audit/probes.yaml.
        max_tokens: per answer and per forcing recitation (short: SmolLM2 on two CPU cores writes ~20
            tokens/s in all).
        concurrency: requests in flight (the profile's max_num_seqs is 8).
        client_policy: send the policy as the client's own system message in the policy arm, instead of
            (or where the gateway lacks) the gateway's key policy.
        reps: bootstrap replicates.
    """
    with demo_stack(out / "stack") as demo:
        _, policy = load_policy(POLICY_FILE)
        settings = AuditSettings(
            base_url=demo.stack.gateway_url + "/v1",
            api_key=demo.baseline_key,
            out=out,
            probes_path=ROOT / "configs" / "audit" / "probes.yaml",
            subset=subset,
            thinking="both",
            policy_key=None if client_policy else demo.policy_key,
            policy_system_prompt=policy.content if client_policy else None,
            policy_label="policy",
            concurrency=concurrency,
            sampling=Sampling(max_tokens=max_tokens, max_tokens_thinking=max_tokens),
            forcing_max_tokens=max_tokens,
            reps=reps,
        )
        return run_audit(settings)
