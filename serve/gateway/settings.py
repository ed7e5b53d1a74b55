"""Gateway settings: defaults < ``configs/gateway.yaml`` < ``KIT_GATEWAY_*`` environment < init arguments.

The YAML path itself comes from ``KIT_GATEWAY_CONFIG`` (read when settings are built, never at import),
so every uvicorn worker process builds the same settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import AnyHttpUrl, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

CONFIG_ENV = "KIT_GATEWAY_CONFIG"
DEFAULT_CONFIG = Path("configs/gateway.yaml")


class GatewaySettings(BaseSettings):
    """Everything the gateway process needs. Units are in the field names (``_s`` seconds, ``_bytes``)."""

    model_config = SettingsConfigDict(env_prefix="KIT_GATEWAY_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    workers: int = Field(default=1, ge=1)
    upstream_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:8000")
    """The vLLM server (bound to loopback by every serve profile)."""
    upstream_api_key: SecretStr | None = None
    """Sent to vLLM as ``Authorization: Bearer`` when vLLM runs with ``--api-key`` (env only, never YAML)."""
    served_model_names: list[str] = Field(default_factory=list)
    """Model ids ``/readyz`` requires in the upstream's ``/v1/models``; empty accepts any."""
    keys_db: Path = Path("state/gateway.sqlite")
    key_cache_ttl_s: float = Field(default=2.0, ge=0)
    """How long a worker trusts its in-memory copy of the active keys: a revoked key stops working
    within this time."""
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1)
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    upstream_read_timeout_s: float = Field(default=600.0, gt=0)
    """Longest silence between two upstream bytes (a long generation streams; a stuck one ends)."""
    upstream_max_connections: int = Field(default=1024, ge=1)
    retry_after_s: int = Field(default=5, ge=1)
    """``Retry-After`` sent with 503 while the upstream is down or starting."""
    log_level: str = "INFO"
    default_chat_template_kwargs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per model id: ``chat_template_kwargs`` a ``/v1/chat/completions`` request gets for the keys it does
    not set itself. vLLM's ``--default-chat-template-kwargs`` is one value for the whole server; this
    lets an adapter trained without reasoning (non-thinking) sit next to a base that thinks by default
    (``kit up`` fills it from each adapter's ``kit-adapter.json``)."""

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
        yaml_file = Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file.is_file():
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        elif CONFIG_ENV in os.environ:
            raise FileNotFoundError(f"{CONFIG_ENV}={yaml_file}: no such file")
        return tuple(sources)
