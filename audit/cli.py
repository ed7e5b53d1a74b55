"""``python -m audit``: the behaviour audit's verbs (the Makefile's ``audit`` and ``audit-demo`` alias them).

python -m audit run [--base-url URL] [--api-key KEY] [--policy-key KEY] [--subset demo] [--thinking both]
python -m audit report OUT          re-score OUT's answers and rewrite OUT/report (asks nothing)
python -m audit demo [--out DIR]    the demo model end to end: start, ask, score, report, stop
python -m audit validate            load the probe set and the policy file into their schemas

Exit codes: 0 done, 1 the endpoint or a process failed (unreachable, key refused, start-up), 2 a
configuration problem (probe YAML, unknown subset, bad flag).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from audit.pipeline import AuditSettings, build_report, headline, load_policy, run_audit
from audit.probes import expand, load_probe_set
from audit.runner import AuditError, Sampling, normalize_base_url
from audit.scorers import MissingDependency
from serve.configfile import ConfigError
from serve.supervisor import StartupError

ROOT = Path(__file__).resolve().parents[1]
PROBES = ROOT / "configs" / "audit" / "probes.yaml"
POLICY = ROOT / "configs" / "audit" / "counter-slant-policy.yaml"
KEY_ENV = "KIT_API_KEY"
POLICY_KEY_ENV = "KIT_AUDIT_POLICY_KEY"


def default_base_url() -> str:
    """The kit's gateway as configured (configs/gateway.yaml / ``KIT_GATEWAY_*``): loopback at its port."""
    from serve.gateway.settings import GatewaySettings

    try:
        settings = GatewaySettings()
    except Exception:  # an invalid gateway config is `kit gateway`'s to report; fall back to the default
        return "http://127.0.0.1:8080/v1"
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    scheme = "https" if settings.ssl_certfile else "http"
    return f"{scheme}://{host}:{settings.port}/v1"


def _default_out(model: str | None, subset: str | None) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model or 'served'}_{subset or 'full'}")
    return ROOT / "state" / "audit" / name


def cmd_run(args: argparse.Namespace) -> int:
    """Ask every probe (both arms, thinking off/on), force recitations, judge (optional), score, report."""
    policy_prompt = None
    if args.client_policy:
        policy_prompt = load_policy(Path(args.client_policy))[1].content
    settings = AuditSettings(
        base_url=normalize_base_url(args.base_url or default_base_url()),
        api_key=args.api_key or os.environ.get(KEY_ENV) or None,
        out=Path(args.out) if args.out else _default_out(args.model, args.subset),
        probes_path=Path(args.probes),
        model=args.model,
        subset=args.subset,
        thinking=args.thinking,
        policy_key=args.policy_key or os.environ.get(POLICY_KEY_ENV) or None,
        policy_system_prompt=policy_prompt,
        concurrency=args.concurrency,
        retries=args.retries,
        sampling=Sampling(
            seed=args.seed, max_tokens=args.max_tokens, max_tokens_thinking=args.max_tokens_thinking
        ),
        forcing=not args.no_forcing,
        forcing_max_tokens=args.forcing_max_tokens,
        forcing_route=args.forcing_route,
        judge=args.judge,
        judge_base_url=normalize_base_url(args.judge_base_url) if args.judge_base_url else None,
        judge_api_key=args.judge_api_key or os.environ.get("KIT_AUDIT_JUDGE_KEY") or None,
        judge_model=args.judge_model,
        reps=args.reps,
    )
    if settings.concurrency < 1:
        raise ConfigError([f"--concurrency {settings.concurrency}: must be at least 1"])
    outcome = run_audit(settings)
    print(f"asked {outcome.asked}, already answered {outcome.skipped}, failed {outcome.errors}")
    print("\n".join(headline(outcome.results)))
    print(f"report: {outcome.report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Re-score the answers in OUT and rewrite OUT/report (no request is sent)."""
    results = build_report(Path(args.out), load_probe_set(Path(args.probes)), args.reps)
    print("\n".join(headline(results)))
    print(f"report: {Path(args.out) / 'report' / 'report.html'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start vLLM (cpu-demo) + the gateway with the counter-slant policy, audit a subset through a plain key
    and a policy key, report, stop."""
    from audit.demo import run_demo

    outcome = run_demo(
        Path(args.out), subset=args.subset, max_tokens=args.max_tokens, client_policy=args.client_policy
    )
    print(f"asked {outcome.asked}, already answered {outcome.skipped}, failed {outcome.errors}")
    print("\n".join(headline(outcome.results)))
    print(f"report: {outcome.report}  (a 135M model: the numbers show the pipeline, not a finding)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Load the probe set (and its subsets) and the policy file into their schemas."""
    probes = load_probe_set(Path(args.probes))
    for name in dict.fromkeys(["full", *probes.subsets]):
        print(f"subset {name}: {len(expand(probes, name))} prompts")
    policy_id, policy = load_policy(Path(args.policy))
    print(f"policy {policy_id} ({policy.mode}, {len(policy.content)} characters): ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    verbs = parser.add_subparsers(dest="verb", required=True)

    run = verbs.add_parser("run", help=cmd_run.__doc__, description=cmd_run.__doc__)
    run.add_argument(
        "--base-url", help="OpenAI-compatible base URL (default: the kit's gateway as configured)"
    )
    run.add_argument("--api-key", help=f"the key (default ${KEY_ENV})")
    run.add_argument(
        "--policy-key",
        help="a second key, e.g. one with the gateway's system-prompt policy: the 'policy' arm "
        f"(${POLICY_KEY_ENV})",
    )
    run.add_argument(
        "--client-policy",
        metavar="POLICY_YAML",
        help="the policy arm sends this policy file's text as its own system message (any endpoint)",
    )
    run.add_argument("--model", help="served model or adapter name (default: the first the endpoint lists)")
    run.add_argument("--probes", default=str(PROBES))
    run.add_argument("--subset", help="a subset of the probe set (default: all of it)")
    run.add_argument("--thinking", choices=["off", "on", "both"], default="both")
    run.add_argument("--concurrency", type=int, default=8)
    run.add_argument("--retries", type=int, default=4)
    run.add_argument("--seed", type=int, default=1234, help="sampling seed (temperature is 0)")
    run.add_argument("--max-tokens", type=int, default=512)
    run.add_argument("--max-tokens-thinking", type=int, default=2048)
    run.add_argument("--forcing-max-tokens", type=int, default=256)
    run.add_argument("--no-forcing", action="store_true", help="skip the thought-token forcing probe")
    run.add_argument(
        "--forcing-route",
        choices=["chat", "completions"],
        default="chat",
        help="chat: continue_final_message (any template); completions: a ChatML prompt with the prefill "
        "inside the open <think> (Qwen; arms without a gateway policy only)",
    )
    run.add_argument("--judge", action="store_true", help="also score every answer with an LLM judge")
    run.add_argument("--judge-base-url", help="the judge's endpoint (default: the audited one)")
    run.add_argument("--judge-api-key", help="the judge's key (default $KIT_AUDIT_JUDGE_KEY, else --api-key)")
    run.add_argument("--judge-model", help="the judge model (default: the audited model)")
    run.add_argument("--reps", type=int, default=2000, help="bootstrap replicates")
    run.add_argument("--out", help="output folder (default state/audit/<model>_<subset>; reruns resume it)")
    run.set_defaults(func=cmd_run)

    report = verbs.add_parser("report", help=cmd_report.__doc__, description=cmd_report.__doc__)
    report.add_argument("out")
    report.add_argument("--probes", default=str(PROBES))
    report.add_argument("--reps", type=int, default=None)
    report.set_defaults(func=cmd_report)

    demo = verbs.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    demo.add_argument("--out", default=str(ROOT / "state" / "audit" / "demo"))
    demo.add_argument("--subset", default="demo")
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.add_argument(
        "--client-policy", action="store_true", help="send the policy as the client's system message instead"
    )
    demo.set_defaults(func=cmd_demo)

    validate = verbs.add_parser("validate", help=cmd_validate.__doc__, description=cmd_validate.__doc__)
    validate.add_argument("--probes", default=str(PROBES))
    validate.add_argument("--policy", default=str(POLICY))
    validate.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one verb; configuration and endpoint problems exit non-zero with a message, not a traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (AuditError, StartupError, MissingDependency) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; answers so far are kept, a rerun with the same --out resumes", file=sys.stderr)
        return 130
