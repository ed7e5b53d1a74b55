"""systemd units for vLLM and the gateway, rendered from a serve profile (``make install-systemd``).

    python -m serve.systemd install h200                      # user units in ~/.config/systemd/user
    sudo .venv/bin/python -m serve.systemd install h200 --mode system --user-name kit
    python -m serve.systemd install cpu-demo --dest /tmp/x    # render under a prefix (tests, packaging)
    python -m serve.systemd install h200 --dry-run            # print the units, write nothing

Two units, ``<prefix>-vllm.service`` and ``<prefix>-gateway.service``:

- **vLLM** runs ``python -m serve.cli serve PROFILE`` (the kit's own ``kit serve``), not a frozen ``vllm
  serve ...`` line: at every start it plans the memory, checks the download marker and the adapters,
  makes the socket folder private and only then ``exec``s vLLM, so the service's main process *is* vLLM
  (systemd's SIGTERM reaches it directly) and a profile edit takes effect at the next restart. The
  printed vLLM command is in the journal at each start.
- **the gateway** runs ``python -m serve.cli gateway``; it is ``BindsTo=`` + ``After=`` the vLLM unit
  (stopped with it) and vLLM ``Upholds=`` it (started again whenever vLLM runs and the gateway does not:
  with ``BindsTo=`` alone a gateway stopped by vLLM's automatic restart would stay down). While vLLM
  loads, the gateway answers 503 with ``Retry-After`` and ``/readyz`` says not ready.
- ``Restart=always``: after its engine died vLLM's API server was seen exiting with status 0, which
  ``on-failure`` would leave down. ``RestartPreventExitStatus=2``: the kit exits 2 on a configuration
  problem (bad profile, model not downloaded, plan does not fit), which a restart cannot fix.
- Logs go to journald (``journalctl [--user] -u kit-vllm -u kit-gateway``). Secrets live in environment
  files (``EnvironmentFile=``, mode 0600, never in a unit): ``gateway.env`` for ``KIT_GATEWAY_DATABASE_URL``,
  ``KIT_GATEWAY_METRICS_KEY``..., ``vllm.env`` for the engine. Settings there override the unit's.

The gateway's address, port, workers and key database stay in ``configs/gateway.yaml`` (or the env file);
the unit sets only what the profile decides (vLLM's socket, served model names, aliases, read timeout), as
``kit up`` does. Re-run ``make install-systemd`` after changing the profile's model or socket.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from serve.atomic import write_text_atomic
from serve.config import ResolvedProfile, load_profile
from serve.configfile import ConfigError, parse_overrides
from serve.gateway.settings import CONFIG_ENV, ROOT_ENV, GatewaySettings
from serve.supervisor import (
    adapter_chat_template_kwargs,
    gateway_env,
    gateway_model_env,
    upstream_read_timeout_s,
    vllm_address,
)

Mode = Literal["user", "system"]

SYSTEMD_ANALYZE = "systemd-analyze"
INSTALL_HINT = "install Debian's package `systemd` (apt-get install systemd), which ships systemd-analyze"

# Exit code of `kit` on a configuration problem (serve/cli.py main): a restart cannot fix it.
CONFIG_EXIT = 2
# Seconds between restarts: vLLM reloads its weights each time (52 GiB for the 27B), no point hurrying.
VLLM_RESTART_S = 10
GATEWAY_RESTART_S = 2
# Added to the drain time before systemd sends SIGKILL (vLLM's engine core and uvicorn workers exit after
# the API process; 30 s / 15 s are margins, not measurements).
VLLM_STOP_MARGIN_S = 30
GATEWAY_STOP_MARGIN_S = 15
# Open files: each client connection is one descriptor in the gateway, plus up to
# upstream_max_connections (1024 by default) per worker towards vLLM; vLLM holds its own connections and
# ZMQ sockets. 65,536 is far above both; systemd's default soft limit is 1,024.
NOFILE = 65536

# Gateway variables that are secrets: they belong in the environment file, never in a unit.
GATEWAY_SECRETS = (
    "KIT_GATEWAY_DATABASE_URL",
    "KIT_GATEWAY_METRICS_KEY",
    "KIT_GATEWAY_UPSTREAM_API_KEY",
)
# Gateway variables `kit up` passes that a service leaves to configs/gateway.yaml or the env file.
_GATEWAY_OWN = ("KIT_GATEWAY_PORT", "KIT_GATEWAY_HOST", "KIT_GATEWAY_KEYS_DB", "KIT_GATEWAY_WORKERS")

_PLAIN_ARG = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


@dataclass(frozen=True)
class Limits:
    """Resource limits written into the units (systemd.resource-control / systemd.exec)."""

    gateway_memory_max: str = "4G"
    """Hard memory cap of the gateway's cgroup (``MemoryMax=``): a safety net against a leak, far above
    what its workers hold (a guess, not a measurement: raise it for many workers)."""
    vllm_memory_max: str | None = None
    """``MemoryMax=`` for vLLM; none by default: its host memory is mostly the page cache of the weights
    (51.8 GiB for Qwen3.6-27B), which a cap would count and evict during loading."""
    nofile: int = NOFILE
    """``LimitNOFILE=`` for both units."""


@dataclass(frozen=True)
class Units:
    """The rendered files: name -> text, and where each goes (without any ``--dest`` prefix)."""

    mode: Mode
    unit_dir: Path
    env_dir: Path
    vllm_name: str
    gateway_name: str
    vllm_unit: str
    gateway_unit: str
    vllm_env_template: str
    gateway_env_template: str

    def files(self) -> dict[Path, tuple[str, int | None, bool]]:
        """Path -> (text, mode, replace): units are replaced on every install; env files are written
        once (mode 0600) and never overwritten, since they hold the operator's secrets."""
        return {
            self.unit_dir / self.vllm_name: (self.vllm_unit, 0o644, True),
            self.unit_dir / self.gateway_name: (self.gateway_unit, 0o644, True),
            self.env_dir / "vllm.env": (self.vllm_env_template, 0o600, False),
            self.env_dir / "gateway.env": (self.gateway_env_template, 0o600, False),
        }

    def commands(self) -> list[str]:
        """The systemctl / journalctl commands that start, inspect and follow the units."""
        ctl = "systemctl --user" if self.mode == "user" else "sudo systemctl"
        journal = "journalctl --user" if self.mode == "user" else "journalctl"
        both = f"{self.vllm_name} {self.gateway_name}"
        lines = [f"{ctl} daemon-reload", f"{ctl} enable --now {both}"]
        if self.mode == "user":
            lines.append("loginctl enable-linger $USER   # start at boot and keep running after logout")
        lines += [
            f"{ctl} status {both}",
            f"{journal} -u {self.vllm_name} -u {self.gateway_name} -f",
            f"{ctl} stop {self.vllm_name}   # stops both (the gateway is bound to vLLM)",
        ]
        return lines


def quote_arg(arg: str) -> str:
    """Quote one ExecStart argument for systemd's own command-line syntax (systemd.service "Command
    lines"): ``%`` specifiers become ``%%`` and ``$`` becomes ``$$`` so nothing is substituted, and an
    argument with other characters goes in double quotes with C-style escapes."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if _PLAIN_ARG.match(escaped):
        return escaped
    for char, escape in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\t", "\\t")):
        escaped = escaped.replace(char, escape)
    return f'"{escaped}"'


def _environment_line(name: str, value: str) -> str:
    """One ``Environment=`` assignment, quoted as systemd.exec documents (the whole ``NAME=value`` in
    double quotes, backslash escapes inside; ``%`` doubled so no specifier expands)."""
    text = f"{name}={value}".replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'Environment="{text}"'


def default_unit_dir(mode: Mode) -> Path:
    """``~/.config/systemd/user`` (``$XDG_CONFIG_HOME`` respected) or ``/etc/systemd/system``."""
    if mode == "system":
        return Path("/etc/systemd/system")
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user"


def default_env_dir(mode: Mode, prefix: str) -> Path:
    """Where the environment files live: ``~/.config/<prefix>`` or ``/etc/<prefix>``."""
    if mode == "system":
        return Path("/etc") / prefix
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / prefix


def _service_user(explicit: str | None) -> str:
    """The account a system unit runs as: ``--user-name``, else the one who ran sudo, else this one."""
    return explicit or os.environ.get("SUDO_USER") or getpass.getuser()


def _gateway_settings(config: Path | None) -> GatewaySettings:
    """The gateway's settings as the service will see them (YAML + environment), for its drain time."""
    saved = os.environ.get(CONFIG_ENV)
    try:
        if config is not None:
            os.environ[CONFIG_ENV] = str(config)
        return GatewaySettings()
    except ValidationError as exc:
        raise ConfigError(
            [f"gateway settings: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        ) from None
    except FileNotFoundError as exc:
        raise ConfigError([str(exc)]) from None
    finally:
        if config is not None:
            if saved is None:
                os.environ.pop(CONFIG_ENV, None)
            else:
                os.environ[CONFIG_ENV] = saved


def _vllm_argv(python: Path, root: Path, profile: str, sets: Sequence[str]) -> list[str]:
    argv = [str(python), "-m", "serve.cli", "--root", str(root), "serve", profile]
    for item in sets:
        argv += ["--set", item]
    return argv


def _profile_gateway_env(resolved: ResolvedProfile, root: Path, settings: GatewaySettings) -> dict[str, str]:
    """What ``kit up`` tells the gateway about this profile's vLLM, less what configs/gateway.yaml owns."""
    url, uds = vllm_address(resolved.profile.vllm)
    env = gateway_env(
        url,
        settings.port,
        settings.keys_db,
        [resolved.model.served_model_name],
        settings.workers,
        settings.host,
        adapter_chat_template_kwargs(resolved.profile.vllm.lora_modules),
        uds,
        upstream_read_timeout_s(resolved),
        **gateway_model_env(resolved, root),
    )
    for name in _GATEWAY_OWN:
        env.pop(name)
    return env


def _unit(sections: Mapping[str, Sequence[str]]) -> str:
    parts = []
    for name, lines in sections.items():
        parts.append("\n".join([f"[{name}]", *lines]))
    return "\n\n".join(parts) + "\n"


def render_units(
    root: Path,
    profile: str,
    sets: Sequence[str] = (),
    *,
    mode: Mode = "user",
    prefix: str = "kit",
    python: Path | None = None,
    user_name: str | None = None,
    gateway_config: Path | None = None,
    limits: Limits | None = None,
) -> Units:
    """Render the two units and the environment-file templates for ``profile``.

    Args:
        root: the kit's folder (holds ``configs/``); made absolute.
        profile: a ``configs/serve/`` name.
        sets: ``KEY=VALUE`` profile overrides, as ``kit serve --set`` takes them; written into ExecStart.
        mode: ``user`` (``~/.config/systemd/user``, runs as you) or ``system`` (``/etc/systemd/system``,
            ``User=`` the service account).
        prefix: unit names are ``<prefix>-vllm.service`` and ``<prefix>-gateway.service``.
        python: the interpreter of the kit's venv (default: the running one).
        user_name: the account of system units (default ``$SUDO_USER`` or the current user).
        gateway_config: a gateway YAML instead of ``configs/gateway.yaml``.
        limits: resource limits (default :class:`Limits`).

    Returns:
        The rendered :class:`Units`.

    Raises:
        ConfigError: the profile or the gateway settings are invalid, or an override is malformed.
    """
    root = root.resolve()
    python = Path(python or sys.executable).absolute()  # not resolved: a venv's python is a symlink
    limits = limits or Limits()
    resolved = load_profile(root, profile, parse_overrides(sets))
    settings = _gateway_settings(gateway_config)
    sets = list(sets)
    drain_s = resolved.profile.vllm.shutdown_timeout
    if drain_s is None:  # as `kit up` does: vLLM lets requests finish as long as the gateway waits for them
        drain_s = settings.shutdown_timeout_s
        sets.append(f"vllm.shutdown_timeout={drain_s}")
    vllm_name, gateway_name = f"{prefix}-vllm.service", f"{prefix}-gateway.service"
    env_dir = default_env_dir(mode, prefix)
    target = "default.target" if mode == "user" else "multi-user.target"

    common_env = [_environment_line(ROOT_ENV, str(root))]
    account = [] if mode == "user" else [f"User={_service_user(user_name)}"]
    hardening = ["NoNewPrivileges=yes"]

    vllm_limits = [f"LimitNOFILE={limits.nofile}"]
    if mode == "system":
        # Pinned host memory for GPU transfers (NVIDIA's container guidance: --ulimit memlock=-1). A user
        # manager cannot raise its own hard limit, and the unit would fail with 205/LIMITS.
        vllm_limits.append("LimitMEMLOCK=infinity")
    if limits.vllm_memory_max:
        vllm_limits.append(f"MemoryMax={limits.vllm_memory_max}")
    vllm_unit = _unit(
        {
            "Unit": [
                f"Description=vLLM, openweights-kit profile {profile} ({resolved.model.served_model_name})",
                "Documentation=file://" + str(root / "README.md"),
                # A user manager has no network-online.target; the system one orders after the network.
                *(["After=network-online.target", "Wants=network-online.target"] if mode == "system" else []),
                f"Upholds={gateway_name}",
                # Never give up: a crash loop is bounded by RestartSec and each start's model load.
                "StartLimitIntervalSec=0",
            ],
            "Service": [
                "Type=exec",
                *account,
                f"WorkingDirectory={root}",
                *common_env,
                f"EnvironmentFile=-{env_dir / 'vllm.env'}",
                "ExecStart=" + " ".join(quote_arg(a) for a in _vllm_argv(python, root, profile, sets)),
                "Restart=always",
                f"RestartSec={VLLM_RESTART_S}",
                f"RestartPreventExitStatus={CONFIG_EXIT}",
                "KillSignal=SIGTERM",
                f"TimeoutStopSec={drain_s + VLLM_STOP_MARGIN_S}",
                "StandardOutput=journal",
                "StandardError=journal",
                f"SyslogIdentifier={prefix}-vllm",
                *vllm_limits,
                *hardening,
            ],
            "Install": [f"WantedBy={target}"],
        }
    )

    gateway_argv = [str(python), "-m", "serve.cli", "--root", str(root), "gateway"]
    if gateway_config is not None:
        gateway_argv += ["--config", str(gateway_config.resolve())]
    profile_env = _profile_gateway_env(resolved, root, settings)
    gateway_unit = _unit(
        {
            "Unit": [
                f"Description=openweights-kit gateway in front of {vllm_name}",
                "Documentation=file://" + str(root / "README.md"),
                f"BindsTo={vllm_name}",
                f"After={vllm_name}",
                "StartLimitIntervalSec=0",
            ],
            "Service": [
                "Type=exec",
                *account,
                f"WorkingDirectory={root}",
                *common_env,
                *(_environment_line(k, v) for k, v in sorted(profile_env.items())),
                f"EnvironmentFile=-{env_dir / 'gateway.env'}",
                "ExecStart=" + " ".join(quote_arg(a) for a in gateway_argv),
                "Restart=always",
                f"RestartSec={GATEWAY_RESTART_S}",
                f"RestartPreventExitStatus={CONFIG_EXIT}",
                "KillSignal=SIGTERM",
                f"TimeoutStopSec={settings.shutdown_timeout_s + GATEWAY_STOP_MARGIN_S}",
                "StandardOutput=journal",
                "StandardError=journal",
                f"SyslogIdentifier={prefix}-gateway",
                f"LimitNOFILE={limits.nofile}",
                f"MemoryMax={limits.gateway_memory_max}",
                *hardening,
            ],
            "Install": [f"WantedBy={target}"],
        }
    )
    secrets = "\n".join(f"# {name}=" for name in GATEWAY_SECRETS)
    gateway_template = (
        f"# Secrets and overrides for {gateway_name} (systemd EnvironmentFile; mode 0600, never committed).\n"
        "# NAME=value per line; these override the unit's Environment= lines. e.g.:\n"
        f"{secrets}\n"
        "# KIT_GATEWAY_PORT=8080\n"
    )
    vllm_template = (
        f"# Environment for {vllm_name} (systemd EnvironmentFile; mode 0600). Serving reads local weights\n"
        "# only (HF_HUB_OFFLINE=1); e.g. CUDA_VISIBLE_DEVICES=0,1 or VLLM_LOGGING_LEVEL=DEBUG.\n"
    )
    return Units(
        mode=mode,
        unit_dir=default_unit_dir(mode),
        env_dir=env_dir,
        vllm_name=vllm_name,
        gateway_name=gateway_name,
        vllm_unit=vllm_unit,
        gateway_unit=gateway_unit,
        vllm_env_template=vllm_template,
        gateway_env_template=gateway_template,
    )


def under(dest: Path | None, path: Path) -> Path:
    """``path`` below the prefix ``dest`` (like ``DESTDIR``), or ``path`` itself without one."""
    return path if dest is None else dest / path.relative_to(path.anchor)


def verify(unit_paths: Sequence[Path], mode: Mode) -> str:
    """Run ``systemd-analyze verify`` on unit files; return its output (empty when it found nothing).

    Any output counts as a problem: systemd-analyze exits 0 on an unknown key or a bad value it ignores,
    and only warns.

    Raises:
        FileNotFoundError: systemd-analyze is not installed (the message says how to install it).
    """
    exe = shutil.which(SYSTEMD_ANALYZE)
    if exe is None:
        raise FileNotFoundError(f"{SYSTEMD_ANALYZE} not found: {INSTALL_HINT}")
    argv = [exe]
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="kit-systemd-") as runtime:
        if mode == "user":
            argv.append("--user")
            env.setdefault("XDG_RUNTIME_DIR", runtime)  # the user manager needs one, even offline
        argv += ["verify", "--man=no", "--generators=no", *map(str, unit_paths)]
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and not output:
        output = f"{SYSTEMD_ANALYZE} verify exited {result.returncode}"
    return output


def install(units: Units, dest: Path | None = None, check: bool = True) -> list[Path]:
    """Write the units (replacing old ones) and the env-file templates (only where none exists), each
    atomically, after ``systemd-analyze verify`` accepted the units (when ``check``).

    Args:
        units: from :func:`render_units`.
        dest: a prefix to install under (tests, packaging); None installs for real.
        check: verify before writing (skipped with a note when systemd-analyze is missing).

    Returns:
        The paths written.

    Raises:
        ConfigError: systemd-analyze rejected the units.
    """
    if check and shutil.which(SYSTEMD_ANALYZE) is not None:
        with tempfile.TemporaryDirectory(prefix="kit-units-") as scratch:
            paths = []
            for name, text in ((units.vllm_name, units.vllm_unit), (units.gateway_name, units.gateway_unit)):
                path = Path(scratch) / name
                path.write_text(text)
                paths.append(path)
            problems = verify(paths, units.mode)
        if problems:
            raise ConfigError(problems.splitlines(), title="systemd-analyze verify rejected the units")
    written = []
    for path, (text, mode, replace) in units.files().items():
        target = under(dest, path)
        if target.exists() and not replace:
            continue
        write_text_atomic(target, text, mode=mode)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m serve.systemd install PROFILE ...``: render, verify, write, print what to run next."""
    parser = argparse.ArgumentParser(prog="python -m serve.systemd", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    sub = verbs.add_parser("install", help="write the units for a profile and print the systemctl commands")
    sub.add_argument("profile")
    sub.add_argument("--root", type=Path, default=Path("."), help="the kit's folder (default .)")
    sub.add_argument("--mode", choices=["user", "system"], default="user")
    sub.add_argument("--dest", type=Path, default=None, help="install under this prefix (like DESTDIR)")
    sub.add_argument("--prefix", default="kit", help="unit name prefix (default kit: kit-vllm.service)")
    sub.add_argument("--user-name", default=None, help="account of system units (default $SUDO_USER)")
    sub.add_argument("--config", type=Path, default=None, help="gateway YAML (default configs/gateway.yaml)")
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="profile override")
    sub.add_argument("--gateway-memory-max", default=Limits.gateway_memory_max)
    sub.add_argument("--vllm-memory-max", default=None)
    sub.add_argument("--dry-run", action="store_true", help="print the units, write nothing")
    sub.add_argument("--no-verify", action="store_true", help="skip systemd-analyze verify")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    os.environ.setdefault(ROOT_ENV, str(root))  # the gateway settings resolve their paths against it
    try:
        units = render_units(
            root,
            args.profile,
            args.set,
            mode=args.mode,
            prefix=args.prefix,
            user_name=args.user_name,
            gateway_config=args.config,
            limits=Limits(gateway_memory_max=args.gateway_memory_max, vllm_memory_max=args.vllm_memory_max),
        )
        if args.dry_run:
            for path, (text, _, _) in units.files().items():
                print(f"# {path}\n{text}")
            return 0
        written = install(units, args.dest, check=not args.no_verify)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return CONFIG_EXIT
    for path in written:
        print(f"wrote {path}")
    settings = _gateway_settings(args.config)
    if settings.database_url is None and not settings.keys_db.exists():
        print(f"no key database yet ({settings.keys_db}): create a key first, e.g. make key NAME=alice")
    print(f"secrets go in {units.env_dir / 'gateway.env'} (mode 0600), never in the units")
    if args.dest is None:
        print("then run:\n  " + "\n  ".join(units.commands()))
    else:
        print(f"rendered under {args.dest}; on the target machine run:\n  " + "\n  ".join(units.commands()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
