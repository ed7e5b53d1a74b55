"""Gateway settings: defaults < ``configs/gateway.yaml`` < ``KIT_GATEWAY_*`` environment < init arguments.

The YAML path itself comes from ``KIT_GATEWAY_CONFIG`` (read when settings are built, never at import),
so every uvicorn worker process builds the same settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import AnyHttpUrl, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from serve.gateway.system_policy import SystemPolicy

CONFIG_ENV = "KIT_GATEWAY_CONFIG"
ROOT_ENV = "KIT_ROOT"


def kit_root() -> Path:
    """The kit's folder (the one holding ``configs/``): ``$KIT_ROOT`` when set, else the checkout this
    package runs from. Relative paths in the gateway's settings resolve against it, never against the
    current directory (started elsewhere, the gateway would otherwise open an empty key database)."""
    if ROOT_ENV in os.environ:
        return Path(os.environ[ROOT_ENV]).resolve()
    return Path(__file__).resolve().parents[2]


def default_config() -> Path:
    """``configs/gateway.yaml`` under the kit's folder."""
    return kit_root() / "configs" / "gateway.yaml"


class GatewaySettings(BaseSettings):
    """Everything the gateway process needs. Units are in the field names (``_s`` seconds, ``_bytes``)."""

    model_config = SettingsConfigDict(env_prefix="KIT_GATEWAY_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    workers: int = Field(default=1, ge=1)
    reuse_port: bool = True
    """With several workers, each listens on its own ``SO_REUSEPORT`` socket, so Linux spreads new
    connections evenly over them (serve/gateway/workers.py); false: uvicorn's one shared socket, where
    the first worker awake takes every waiting connection. Ignored where the platform lacks it."""
    upstream_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:8000")
    """The vLLM server (bound to loopback by every serve profile)."""
    upstream_uds: Path | None = None
    """vLLM's Unix socket (a profile's ``vllm.uds``). When set, connections go to this socket and
    ``upstream_url`` only supplies the Host header and the request URLs."""
    upstream_api_key: SecretStr | None = None
    """Sent to vLLM as ``Authorization: Bearer`` when vLLM runs with ``--api-key`` (env only, never YAML)."""
    served_model_names: list[str] = Field(default_factory=list)
    """Model ids ``/readyz`` requires in the upstream's ``/v1/models``; empty accepts any."""
    upstream_health_path: str | None = "/health"
    """The upstream path ``/readyz`` asks before the model listing (vLLM's ``/health``: 200 once its
    engine runs). None or "": readiness is the listing alone, for an upstream without such a route (Ray
    Serve LLM's OpenAI app, ray 2.60, serves none: deploy/k8s/gateway.yaml sets it empty)."""
    keys_db: Path = Path("state/gateway.sqlite")
    """The SQLite file with keys, limit counters and the usage ledger (relative: to the kit's folder)."""
    database_url: str | None = None
    """A SQLAlchemy URL used instead of ``keys_db``, e.g. ``postgresql+psycopg://kit@db-host/kit`` when
    several gateway hosts share keys, limits and the ledger. Put a password in the environment
    (``KIT_GATEWAY_DATABASE_URL``) or in ``~/.pgpass``, never in the YAML."""
    create_keys_db: bool = False
    """Create the SQLite file when it is missing. Off: a gateway pointed at a missing file refuses to
    start (it would answer 401 to every key) instead of creating an empty one."""
    key_cache_ttl_s: float = Field(default=2.0, ge=0)
    """How long a worker trusts its in-memory copy of the active keys: a revoked or expired key, or a
    policy change, takes effect within this time."""
    ledger_flush_interval_s: float = Field(default=0.25, gt=0)
    """Longest a usage-ledger row waits in a worker's memory before its batch is written."""
    unreserved_output_tokens: int = Field(default=4096, ge=0)
    """Output tokens a request that sets no ``max_tokens`` reserves against ``tpm`` and budgets (settled
    to its real usage when it ends)."""
    max_request_s: float = Field(default=6 * 3600, gt=0)
    """Longest a request may hold an in-flight slot (``max_concurrent``) if its worker dies before it
    releases the slot."""
    limits_store: Literal["auto", "memory", "database"] = "auto"
    """Where per-key limits count: ``memory`` shared by this host's workers (microseconds per request; the
    ledger seeds the budgets at start), or ``database`` (a transaction per request on the shared
    database: exact across several gateway hosts). ``auto``: ``database`` when ``database_url`` is set,
    else ``memory``."""
    metrics_key: SecretStr | None = None
    """When set, ``/metrics`` needs ``Authorization: Bearer <metrics_key>`` (env only)."""
    ssl_certfile: Path | None = None
    """Serve HTTPS with this certificate (PEM; with ``ssl_keyfile``), through uvicorn's TLS options."""
    ssl_keyfile: Path | None = None
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1)
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    upstream_read_timeout_s: float = Field(default=3600.0, gt=0)
    """Longest silence between two upstream bytes. A non-streamed answer is silent until it is complete,
    so this must exceed the longest generation a profile allows: ``kit up`` raises it to
    ``max_model_len / 10`` seconds (10 tokens/s, the slowest decode the kit plans for). Past it the
    client gets 504 (no ``Retry-After``: a retry would repeat the whole generation)."""
    upstream_max_connections: int = Field(default=1024, ge=1)
    adapters_dir: Path | None = None
    """Folder whose sub-folders admin keys may load into vLLM at runtime by name (``POST
    /v1/adapters/load``); None: runtime adapters are off. Relative: to the kit's folder."""
    base_model_dir: Path | None = None
    """The served base's folder, for the adapter checks before a runtime load (``kit up`` sets it)."""
    max_lora_rank: int | None = None
    """The profile's ``max_lora_rank``, for the same checks (``kit up`` sets it)."""
    cors_allow_origins: list[str] = Field(default_factory=list)
    """Browser origins allowed to call the API (``https://app.example.com``; ``*`` for any). Empty (the
    default): no CORS headers, so browsers refuse cross-origin calls. Keys still apply to every call."""
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.1"])
    """Addresses (or CIDR ranges) of reverse proxies whose ``X-Forwarded-For`` / ``X-Forwarded-Proto``
    the gateway believes (uvicorn's ``forwarded_allow_ips``); the ledger's ``client_ip`` is then the
    address the proxy saw. Others' forwarded headers are ignored."""
    shutdown_timeout_s: int = Field(default=30, ge=0)
    """On SIGTERM the gateway stops accepting and lets in-flight requests finish for this long; then a
    stream still running ends with an error event and an unanswered request gets 503 (uvicorn's
    ``timeout_graceful_shutdown``; ``kit up`` gives vLLM's ``--shutdown-timeout`` the same value)."""
    gc_gen0_threshold: int | None = Field(default=20_000, ge=700)
    """Each worker freezes what it built at start-up and runs a young garbage collection only after this
    many net container allocations (Python's default: 700), so requests' objects are freed by reference
    counting instead of being walked by the collector (serve/gateway/gc_policy.py has the measurements).
    None: Python's defaults."""
    retry_after_s: int = Field(default=5, ge=1)
    """``Retry-After`` sent with 503 while the upstream is down or starting."""
    log_level: str = "INFO"
    default_chat_template_kwargs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per model id: ``chat_template_kwargs`` a ``/v1/chat/completions`` request gets for the keys it does
    not set itself. vLLM's ``--default-chat-template-kwargs`` is one value for the whole server; this
    lets an adapter trained without reasoning (non-thinking) sit next to a base that thinks by default
    (``kit up`` fills it from each adapter's ``kit-adapter.json``)."""

    model_aliases: dict[str, str] = Field(default_factory=dict)
    """Client model id (or ``*`` glob) -> served model id or adapter name, e.g. ``claude-*:
    Qwen/Qwen3.6-27B`` for Claude Code (``kit up`` adds each served model's ``aliases`` from its model
    config). Keys' allowed models are checked against the served model. See ``serve/gateway/aliases.py``."""
    non_thinking_sampling: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per served model id: the sampling preset a request that does not think and sets no sampling field
    gets (the model card's non-thinking preset; ``kit up`` fills it from ``sampling.non_thinking``)."""

    system_policies: dict[str, SystemPolicy] = Field(default_factory=dict)
    """Policy id -> a system message (``content``, ``mode``: ``merge`` or ``prepend``) the gateway adds
    to the requests of keys created with ``--system-policy <id>`` and of the models named in
    ``model_system_policies``; the ledger's ``policy_id`` says which one a request carried. See
    ``serve/gateway/system_policy.py``."""
    model_system_policies: dict[str, str] = Field(default_factory=dict)
    """Served model id or adapter name -> policy id for every request to it (a key's own policy wins)."""

    @model_validator(mode="after")
    def _known_policies(self) -> GatewaySettings:
        for model, policy_id in self.model_system_policies.items():
            if policy_id not in self.system_policies:
                known = ", ".join(sorted(self.system_policies)) or "none defined"
                raise ValueError(
                    f"model_system_policies: {model!r} names policy {policy_id!r}, which system_policies "
                    f"does not define (defined: {known})"
                )
        for policy_id in self.system_policies:
            if not policy_id or len(policy_id) > 64:
                raise ValueError(f"system_policies: id {policy_id!r} must be 1 to 64 characters")
        return self

    @model_validator(mode="after")
    def _resolve_paths(self) -> GatewaySettings:
        root = kit_root()
        for name in (
            "keys_db",
            "ssl_certfile",
            "ssl_keyfile",
            "upstream_uds",
            "adapters_dir",
            "base_model_dir",
        ):
            value = getattr(self, name)
            if value is not None and not value.is_absolute():
                setattr(self, name, root / value)
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("set both ssl_certfile and ssl_keyfile for HTTPS, or neither")
        return self

    @property
    def limits_in_memory(self) -> bool:
        """Whether limits count in memory shared by this host's workers (see ``limits_store``)."""
        return self.limits_store == "memory" or (self.limits_store == "auto" and self.database_url is None)

    @property
    def counters_file(self) -> Path:
        """The memory-mapped file of the in-memory limit counters (one per gateway port)."""
        return self.keys_db.parent / "run" / f"gateway-limits-{self.port}.counters"

    @property
    def database(self) -> str:
        """The SQLAlchemy URL of the gateway's database."""
        return self.database_url or f"sqlite:///{self.keys_db}"

    @field_validator("upstream_uds", "upstream_health_path", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value  # e.g. KIT_GATEWAY_UPSTREAM_UDS="" selects TCP

    @field_validator("upstream_health_path")
    @classmethod
    def _health_path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"must be a path starting with '/' (like /health), or empty; got {value!r}")
        return value

    @field_validator("upstream_url")
    @classmethod
    def _no_trailing_slash(cls, value: AnyHttpUrl) -> AnyHttpUrl:
        return AnyHttpUrl(str(value).rstrip("/"))

    @property
    def upstream_base(self) -> str:
        """The upstream URL without a trailing slash, ready for ``base + path``."""
        return str(self.upstream_url).rstrip("/")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = Path(os.environ[CONFIG_ENV]) if CONFIG_ENV in os.environ else default_config()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file.is_file():
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        elif CONFIG_ENV in os.environ:
            raise FileNotFoundError(f"{CONFIG_ENV}={yaml_file}: no such file")
        return tuple(sources)
