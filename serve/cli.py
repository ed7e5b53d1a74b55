"""``kit``: one verb per job. The Makefile targets are one-line aliases over these verbs.

kit serve PROFILE [--dry-run] [--set vllm.port=8001]   run vLLM for a profile (or print the command)
kit gateway                                             run the gateway (configs/gateway.yaml + env)
kit up PROFILE                                          vLLM + gateway together, until Ctrl-C
kit key create|list|set|rotate|revoke [NAME] [policy]   manage gateway API keys and their limits
kit usage [--key NAME] [--days N]                       usage per day, key and model from the ledger
kit demo                                                ask the embedded model a question, end to end
kit validate                                            check every shipped config
kit plan PROFILE [--set k=v]                            memory plan: does the profile fit its GPUs?
kit start PROFILE | stop | status | logs [-f]           `kit up` in the background, as a service

This module knows serve's verbs only (``python -m serve.cli gateway`` is how ``kit up`` starts the
gateway). The ``kit`` console script is ``finetune.cli:main``: this parser plus the fine-tune verbs, so
the dependency points one way (finetune imports serve; serve never imports finetune).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from serve import keys_cli, service, service_logs, service_status
from serve.adapters import check_adapter
from serve.config import (
    DownloadSettings,
    ResolvedProfile,
    adapter_rank,
    available,
    load_model_config,
    load_profile,
    lora_rank_for,
)
from serve.configfile import ConfigError, load_yaml, parse_overrides
from serve.gateway.keys import KeyError_, KeyStore
from serve.gateway.logconfig import log_config
from serve.gateway.settings import CONFIG_ENV, GatewaySettings
from serve.modeldir import not_ready_reason
from serve.processes import SERVICE_ID_ENV
from serve.render import render
from serve.service import READY_PREFIX, ServiceError
from serve.supervisor import StartupError, prepare_uds, run_stack, vllm_address

logger = logging.getLogger("kit")


class _Stop(Exception):
    """Raised by the SIGTERM handler so context managers shut children down."""


def _adapter_overrides(pairs: list[str], base: dict[str, Any]) -> dict[str, Any]:
    """``--adapter NAME=PATH`` -> profile overrides that load the adapters at start (LoRA on, a rank that
    holds the largest adapter)."""
    if not pairs:
        return base
    modules: dict[str, str] = {}
    rank = 1
    for pair in pairs:
        name, sep, path = pair.partition("=")
        config = Path(path) / "adapter_config.json"
        if not sep or not name or not config.is_file():
            raise ConfigError(
                [f"--adapter {pair!r}: expected NAME=PATH to a peft adapter folder ({config} not found)"]
            )
        modules[name] = str(Path(path).resolve())
        try:
            rank = max(rank, adapter_rank(json.loads(config.read_text())))
        except (ValueError, AttributeError) as exc:  # JSONDecodeError is a ValueError
            raise ConfigError([f"{config}: not a valid peft adapter config: {exc}"]) from None
    return {
        **base,
        "vllm.enable_lora": True,
        "vllm.max_lora_rank": lora_rank_for(rank),
        "vllm.max_loras": max(len(modules), 1),
        "vllm.lora_modules": modules,
    }


def _profile_of(args: argparse.Namespace) -> ResolvedProfile:
    """The profile a serving verb names, with its ``--set`` and ``--adapter`` overrides applied."""
    return load_profile(args.root, args.profile, _adapter_overrides(args.adapter, parse_overrides(args.set)))


def _gateway_settings(config: Path | None) -> GatewaySettings:
    if config is not None:
        os.environ[CONFIG_ENV] = str(config)
    try:
        return GatewaySettings()
    except ValidationError as exc:
        source = os.environ.get(CONFIG_ENV, "configs/gateway.yaml")
        raise ConfigError(
            [f"{source} / KIT_GATEWAY_*: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        ) from None
    except FileNotFoundError as exc:
        raise ConfigError([str(exc)]) from None


def _check_adapters(resolved: ResolvedProfile) -> None:
    """Run ``check-adapter``'s static checks on every adapter the profile will load, before vLLM starts
    (vLLM would otherwise fail ~30 s into its start-up with a traceback, or serve a no-op adapter).

    Raises:
        ConfigError: every problem of every adapter, with the command that shows the full report.
    """
    problems = []
    vllm = resolved.profile.vllm
    for name, path in vllm.lora_modules.items():
        served = resolved.model.served_model_name
        report = check_adapter(Path(path), resolved.model_dir, served, vllm.max_lora_rank)
        problems += [f"adapter {name} ({path}): {problem}" for problem in report.problems]
    if problems:
        raise ConfigError(
            problems,
            hint="`make check-adapter ADAPTER=<dir> PROFILE=<profile>` shows each check; train the adapter "
            "for this profile's base model, or serve it with the profile it was trained for",
            title=f"adapters that profile {resolved.name} cannot serve",
        )


def _plan_first(resolved: ResolvedProfile, skip: bool) -> None:
    """Run the memory planner before vLLM loads anything (cuda profiles only; a cpu profile's KV space
    is fixed in the profile and vLLM checks it in seconds). Prints the plan; refuses one that does not
    fit unless ``--no-plan-check`` or ``plan.check: false``.

    Raises:
        ConfigError: the plan does not fit, or the model YAML's numbers differ from its config.json.
    """
    from serve.config_check import check_config_json
    from serve.plan import enforce, plan, query_nvidia_smi

    if resolved.profile.vllm_build != "cuda":
        return
    if skip or not resolved.profile.plan.check:
        print("memory plan: skipped (--no-plan-check / plan.check=false)", flush=True)
        return
    if resolved.model.architecture_numbers is None:
        print(
            f"memory plan: skipped, configs/models/{resolved.model.name}.yaml has no architecture_numbers",
            flush=True,
        )
        return
    check_config_json(resolved)
    result = plan(resolved, query_nvidia_smi())
    print(result.report(), flush=True)
    enforce(result)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print a profile's memory plan (weights, KV cache, Gated DeltaNet state per GPU; what fits).

    GPU memory comes from nvidia-smi when present, else the profile's gpu_memory_gib. Works before the
    weights are downloaded (the model YAML's architecture_numbers); checks them against the downloaded
    config.json when there is one. Exit 2 when the profile cannot start, with the nearest setting that fits.
    """
    from serve.config_check import check_config_json
    from serve.plan import enforce, plan, query_nvidia_smi

    resolved = load_profile(args.root, args.profile, parse_overrides(args.set))
    checked = check_config_json(resolved)
    smi = query_nvidia_smi() if resolved.profile.vllm_build == "cuda" else None
    result = plan(resolved, smi)
    print(result.report())
    print(
        "  architecture numbers: " + (f"match {checked}" if checked else "not checked (no config.json yet)")
    )
    enforce(result)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run vLLM for a serve profile in the foreground (``--dry-run`` prints the exact command only)."""
    resolved = _profile_of(args)
    command = render(resolved)
    if args.dry_run:
        print(command.shell())
        return 0
    _plan_first(resolved, args.no_plan_check)  # before the download check: plan before fetching 52 GiB
    reason = not_ready_reason(resolved)
    if reason:
        raise ConfigError([reason], title="the model is not ready to serve")
    _check_adapters(resolved)
    if resolved.profile.vllm.uds is not None:
        prepare_uds(resolved.profile.vllm.uds)
    print(command.shell(), flush=True)
    env = {**os.environ, **command.env}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    os.execvpe(command.argv[0], command.argv, env)
    return 0  # not reached


def cmd_gateway(args: argparse.Namespace) -> int:
    """Run the gateway under uvicorn (uvloop + httptools) with the configured number of workers."""
    settings = _gateway_settings(args.config)
    if settings.database_url is None and not settings.keys_db.exists() and not settings.create_keys_db:
        raise ConfigError(
            [f"the gateway's key database {settings.keys_db} does not exist"],
            hint="create a key first (make key NAME=...), point keys_db / KIT_GATEWAY_KEYS_DB at the right "
            "file, or set create_keys_db: true to start with an empty one",
        )
    if settings.database_url is None:
        # Created (where allowed), put in WAL mode and given its tables once, here, before the workers
        # open the file together.
        KeyStore(settings.database, create=settings.create_keys_db).engine.dispose()
    tls: dict[str, Any] = {}
    if settings.ssl_certfile is not None:
        tls = {"ssl_certfile": str(settings.ssl_certfile), "ssl_keyfile": str(settings.ssl_keyfile)}
    # A new start counts limits afresh: the workers seed the in-memory counters from the usage ledger.
    settings.counters_file.unlink(missing_ok=True)
    metrics_dir: str | None = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Must be set before any worker imports prometheus_client (multiprocess mode); removed at exit.
        metrics_dir = tempfile.mkdtemp(prefix="kit-gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        _run_uvicorn(settings, tls)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _run_uvicorn(settings: GatewaySettings, tls: dict[str, Any]) -> None:
    """uvicorn with the gateway's factory and settings, until it stops (SIGTERM / SIGINT). Several
    workers run under ``serve.gateway.workers`` (a ``SO_REUSEPORT`` socket each) when ``reuse_port`` is
    on and the platform has it, else under uvicorn's own supervisor (one socket shared by all).

    Raises:
        StartupError: the address cannot be bound, or a worker exited while starting.
    """
    import uvicorn

    from serve.gateway.workers import WorkersFailed, reuse_port_supported, run_workers

    config: dict[str, Any] = dict(
        app="serve.gateway.app:create_app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,  # the gateway writes its own access log, without prompts or keys
        log_config=log_config(settings.log_level),  # applied in every worker process
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        proxy_headers=True,
        forwarded_allow_ips=",".join(settings.trusted_proxies),
        **tls,
    )
    if settings.workers > 1 and settings.reuse_port and reuse_port_supported():
        try:
            run_workers(config, settings.workers, stop_timeout_s=settings.shutdown_timeout_s + 10)
        except OSError as exc:
            raise StartupError(
                f"the gateway cannot listen on {settings.host}:{settings.port}: {exc}; stop what holds "
                "that port or set port (KIT_GATEWAY_PORT) to a free one"
            ) from None
        except WorkersFailed as exc:
            raise StartupError(f"{exc}; its log lines above say why") from None
        return
    uvicorn.run(config.pop("app"), workers=settings.workers, **config)


def _public_url(host: str, port: int) -> str:
    """Where to call the gateway's OpenAI API: a wildcard bind address is not a URL, so name this machine."""
    if host in {"0.0.0.0", "::", ""}:
        return (
            f"http://{socket.gethostname()}:{port}/v1 (all interfaces; here also http://127.0.0.1:{port}/v1)"
        )
    return f"http://{host}:{port}/v1"


def _install_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise _Stop()

    signal.signal(signal.SIGTERM, handler)


def cmd_up(args: argparse.Namespace) -> int:
    """Start vLLM and the gateway together, wait until both are ready, stop both on Ctrl-C or SIGTERM."""
    resolved = _profile_of(args)
    _plan_first(resolved, args.no_plan_check)  # before the download check: plan before fetching 52 GiB
    reason = not_ready_reason(resolved)
    if reason:
        raise ConfigError([reason], title="the model is not ready to serve")
    _check_adapters(resolved)
    settings = _gateway_settings(args.config)
    if resolved.profile.vllm.shutdown_timeout is None:
        # vLLM lets running requests finish as long as the gateway waits for them on SIGTERM.
        vllm = resolved.profile.vllm.model_copy(update={"shutdown_timeout": settings.shutdown_timeout_s})
        resolved = dataclasses.replace(resolved, profile=resolved.profile.model_copy(update={"vllm": vllm}))
    if settings.database_url is None and not settings.keys_db.exists():
        # `kit up` is the kit's own start: it creates the key database where the gateway will look.
        KeyStore(settings.database).engine.dispose()
        print(f"created an empty key database {settings.keys_db}; add keys: make key NAME=...", flush=True)
    _install_sigterm()
    log_dir = args.root / "state" / "logs"
    print(f"starting vLLM ({resolved.profile.hardware}); log: {log_dir / 'vllm.log'}", flush=True)
    try:
        with run_stack(
            resolved,
            keys_db=settings.keys_db,
            log_dir=log_dir,
            gateway_port=settings.port,
            gateway_host=settings.host,
            gateway_workers=settings.workers,
        ) as stack:
            models = [stack.served_model_name, *resolved.profile.vllm.lora_modules]
            stops = "`make stop` stops both" if SERVICE_ID_ENV in os.environ else "Ctrl-C stops both"
            print(
                f"{READY_PREFIX}models {models} at {_public_url(settings.host, settings.port)}; keys: make "
                f"key NAME=... {stops}.",
                flush=True,
            )
            while all(c.alive() for c in stack.children()):
                time.sleep(0.5)
            for child in stack.children():
                child.check_alive()
    except (KeyboardInterrupt, _Stop):
        print("stopped vLLM and the gateway", flush=True)  # run_stack has stopped both by now
    return 0


def _local_url(host: str, port: int, tls: bool) -> str:
    """The gateway's base URL from this machine (a wildcard bind address answers on loopback)."""
    if host in {"0.0.0.0", ""}:
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"{'https' if tls else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"


def cmd_start(args: argparse.Namespace) -> int:
    """Start vLLM + the gateway in the background (`kit up`, detached); return once they answer.

    Returns once vLLM answered a real request and the gateway is ready. Record (state/service.json) and
    logs (state/logs/) under state/; then `kit status`, `kit logs`, `kit stop`.

    Exit codes: 0 started, 1 already running or did not start (its log's end is shown), 2 configuration.
    """
    # Checked here, before anything detaches, so a bad profile or --set fails at once; the supervisor
    # runs every other check of `kit up` and its errors are echoed.
    resolved = _profile_of(args)
    settings = _gateway_settings(args.config)
    vllm_url, uds = vllm_address(resolved.profile.vllm)
    vllm_drain = resolved.profile.vllm.shutdown_timeout
    command = [sys.executable, "-m", "serve.cli", "--root", str(args.root.absolute()), "up", args.profile]
    command += [f"--set={pair}" for pair in args.set] + [f"--adapter={pair}" for pair in args.adapter]
    command += ["--no-plan-check"] if args.no_plan_check else []
    command += [f"--config={args.config.absolute()}"] if args.config is not None else []
    spec = service.LaunchSpec(
        command=command,
        profile=args.profile,
        gateway_url=_local_url(settings.host, settings.port, settings.ssl_certfile is not None),
        vllm_url=vllm_url,
        vllm_uds=uds,
        gateway_drain_s=settings.shutdown_timeout_s,
        vllm_drain_s=vllm_drain if vllm_drain is not None else settings.shutdown_timeout_s,
        ready_timeout_s=resolved.profile.startup_timeout_s + 120,  # + the gateway's start (60 s) + margin
    )
    paths = service.ServicePaths.under(args.root)
    with service.explain_os_errors(paths):
        return service.start(paths, spec, sys.stdout)


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop the background service: drain, kill what is left, check that nothing remains.

    The gateway and then vLLM drain in-flight requests (their shutdown timeouts); what is left of their
    process groups is then killed, and no process of the service may remain. Exit 0 also when none ran.
    """
    paths = service.ServicePaths.under(args.root)
    with service.explain_os_errors(paths):
        return service.stop(paths, sys.stdout)


def cmd_status(args: argparse.Namespace) -> int:
    """Show the background service: health, models, adapters, GPU memory, uptime, PIDs, logs.

    Exit codes (LSB): 0 running, 1 dead with processes left, 3 not running.
    """
    paths = service.ServicePaths.under(args.root)
    with service.explain_os_errors(paths):
        return service_status.status(paths, sys.stdout)


def cmd_logs(args: argparse.Namespace) -> int:
    """Print the last lines of the service's logs (state/logs: service, vllm, gateway); -f follows them."""
    paths = service.ServicePaths.under(args.root)
    try:
        with service.explain_os_errors(paths):
            files = service_logs.show_logs(paths, args.log, args.lines, sys.stdout)
            if args.follow:
                shown = files[0] if len(files) == 1 else None
                for path, text in service_logs.follow_logs(files):
                    if path != shown:
                        print(f"\n==> {path} <==", flush=True)
                        shown = path
                    sys.stdout.write(text)
                    sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `kit logs | head`: Python would fail again flushing stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of lines, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more lines, got {value}")
    return value


def cmd_key(args: argparse.Namespace) -> int:
    """Create, list, change, rotate or revoke gateway API keys (stored hashed in the gateway database)."""
    return keys_cli.cmd_key(args, _gateway_settings(args.config))


def cmd_usage(args: argparse.Namespace) -> int:
    """Print usage per UTC day, key and model from the gateway's ledger (reasoning tokens apart)."""
    return keys_cli.cmd_usage(args, _gateway_settings(args.config))


def cmd_download(args: argparse.Namespace) -> int:
    """Download a model's weights (default qwen3.6-27b) from the Hugging Face Hub and verify them.

    Respects HF_TOKEN, HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE. Exit codes: 1 failure, 3 licence refused,
    4 not enough disk space.
    """
    from serve.download import DownloadError, Target, download

    configs = args.root / "configs"
    settings = load_yaml(configs / "download.yaml", DownloadSettings)
    if args.repo:
        name = args.repo.split("/")[-1].lower()
        target = Target(
            args.repo, args.revision, args.local_dir or args.root / "models" / name, settings.allowed_licenses
        )
    else:
        model = load_model_config(configs, args.model)
        if model.source != "hub":
            raise ConfigError([f"{model.name} is built locally, not downloaded: run `make models`"])
        target = Target.from_model(model, args.root)
        if args.revision or args.local_dir:
            target = replace(
                target,
                revision=args.revision or target.revision,
                local_dir=args.local_dir or target.local_dir,
            )
    try:
        download(
            target,
            settings,
            accept_license=args.accept_license,
            dry_run=args.dry_run,
            reverify=args.verify,
            config_only=args.config_only,
        )
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Serve the embedded model with vLLM behind the gateway and stream one answer with the openai SDK."""
    from serve.demo import run_demo

    return run_demo(args.root, args.profile, args.question)


@dataclass(frozen=True)
class ConfigKind:
    """One more kind of shipped config for ``kit validate`` to load (plugged in by ``finetune.cli``)."""

    folder: str
    """Every ``configs/<folder>/*.yaml`` is checked."""
    noun: str
    """What the summary line calls them (``recipes``)."""
    load: Callable[[Path, str], object]
    """``load(root, name)``; raises ConfigError on a problem."""


VerbAdder = Callable[[str, Callable[[argparse.Namespace], int]], argparse.ArgumentParser]
"""``verb(name, function)`` adds a sub-command to ``kit``; its help is the function's docstring."""


def cmd_validate(args: argparse.Namespace) -> int:
    """Load every model config, serve profile and the gateway config; report all problems at once."""
    configs = args.root / "configs"
    kinds: tuple[ConfigKind, ...] = args.config_kinds
    checks: list[tuple[Any, tuple[Any, ...]]] = [
        (load_model_config, (configs, n)) for n in available(configs, "models")
    ]
    checks += [(load_profile, (args.root, n)) for n in available(configs, "serve")]
    checks += [(kind.load, (args.root, n)) for kind in kinds for n in available(configs, kind.folder)]
    checks += [
        (_gateway_settings, (args.config,)),
        (load_yaml, (configs / "download.yaml", DownloadSettings)),
    ]
    problems: list[str] = []
    for check, check_args in checks:
        try:
            check(*check_args)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    counts = [f"{len(available(configs, 'models'))} models", f"{len(available(configs, 'serve'))} profiles"]
    counts += [f"{len(available(configs, kind.folder))} {kind.noun}" for kind in kinds]
    print(f"ok: {', '.join(counts)}, gateway and download configs")
    return 0


_ADAPTER_HELP = "serve a LoRA adapter under model id NAME (repeatable)"
_NO_PLAN_HELP = (
    "start even where the memory planner says the profile does not fit (same as --set plan.check=false)"
)


def build_parser(
    add_verbs: Callable[[VerbAdder], None] | None = None, validate_also: Sequence[ConfigKind] = ()
) -> argparse.ArgumentParser:
    """The ``kit`` argument parser with serve's verbs; each verb's help is its function's docstring.

    Args:
        add_verbs: called with the ``verb(name, function)`` helper to register more verbs (the fine-tune
            ones, from ``finetune.cli``).
        validate_also: more kinds of shipped configs that ``kit validate`` loads.

    Returns:
        The parser; ``args.func(args)`` runs the chosen verb.
    """
    parser = argparse.ArgumentParser(prog="kit", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, default=Path("."), help="kit folder holding configs/ (default .)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True)

    def verb(name: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        doc = func.__doc__ or name
        sub = verbs.add_parser(name, help=doc.splitlines()[0], description=doc)
        sub.set_defaults(func=func)
        return sub

    def add_config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config",
            type=Path,
            default=None,
            help=f"gateway YAML (default ${CONFIG_ENV} or configs/gateway.yaml)",
        )

    sub = verb("download", cmd_download)
    sub.add_argument("model", nargs="?", default="qwen3.6-27b", help="a configs/models/ name")
    sub.add_argument("--repo", help="any hub repo_id instead of a model config")
    sub.add_argument("--revision", help="commit sha (default: the model config's pinned revision)")
    sub.add_argument("--local-dir", type=Path, help="target folder (default: the config's local_dir)")
    sub.add_argument("--dry-run", action="store_true", help="print what would be fetched, fetch nothing")
    sub.add_argument("--accept-license", action="store_true", help="accept a licence outside the allowlist")
    sub.add_argument("--verify", action="store_true", help="re-hash an already complete copy")
    sub.add_argument(
        "--config-only",
        action="store_true",
        help="only configs and tokenizer (a few MB): enough to validate fine-tune data",
    )
    sub = verb("serve", cmd_serve)
    sub.add_argument("profile")
    sub.add_argument("--dry-run", action="store_true", help="print the command, start nothing")
    sub.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help=_ADAPTER_HELP)
    sub.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile field, e.g. vllm.port=8001 (repeatable)",
    )
    sub.add_argument("--no-plan-check", action="store_true", help=_NO_PLAN_HELP)
    sub = verb("plan", cmd_plan)
    sub.add_argument("profile")
    sub.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile field, e.g. vllm.max_num_seqs=32 (repeatable)",
    )
    sub = verb("gateway", cmd_gateway)
    add_config(sub)
    for name, func in (("up", cmd_up), ("start", cmd_start)):  # start is up in the background
        sub = verb(name, func)
        sub.add_argument("profile")
        sub.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help=_ADAPTER_HELP)
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        sub.add_argument("--no-plan-check", action="store_true", help=_NO_PLAN_HELP)
        add_config(sub)
    verb("stop", cmd_stop)
    verb("status", cmd_status)
    sub = verb("logs", cmd_logs)
    sub.add_argument("log", nargs="?", default="all", choices=["all", "service", "vllm", "gateway"])
    sub.add_argument(
        "-f", "--follow", action="store_true", help="keep printing what is appended (Ctrl-C ends)"
    )
    sub.add_argument("-n", "--lines", type=_non_negative, default=50, help="lines of each log (default 50)")
    sub = verb("key", cmd_key)
    keys_cli.add_key_arguments(sub)
    add_config(sub)
    sub = verb("usage", cmd_usage)
    keys_cli.add_usage_arguments(sub)
    add_config(sub)
    sub = verb("demo", cmd_demo)
    sub.add_argument("--profile", default="cpu-demo")
    sub.add_argument("--question", default="What is the capital of France?")
    sub = verb("validate", cmd_validate)
    sub.set_defaults(config_kinds=tuple(validate_also))
    add_config(sub)
    if add_verbs is not None:
        add_verbs(verb)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run one verb; configuration and start-up problems exit non-zero with a message, not a traceback.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
        parser: the parser to use (default: serve's verbs only; ``finetune.cli.main`` passes the full one).

    Returns:
        The exit code: 0 success, 1 start-up or key failures, 2 configuration problems.
    """
    args = (parser or build_parser()).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpx2", "httpcore"):  # a line per request otherwise (openai logs as httpx2)
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    # bitsandbytes (imported by peft) warns on every CPU run that an optional kernel could not be fetched
    # from the Hugging Face Hub; its CPU path works without it.
    bnb_level = logging.DEBUG if args.verbose else logging.ERROR
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(bnb_level)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (StartupError, KeyError_) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
