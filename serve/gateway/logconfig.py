"""Logging for gateway processes, as a ``logging.config`` dict that uvicorn applies in every worker.

uvicorn starts each worker as a fresh process: logging set up in the parent does not carry over, so the
configuration travels as uvicorn's ``log_config``. The access log (``serve.gateway.access``) is one JSON
object per line with no prefix, ready for a log shipper.
"""

from __future__ import annotations

from typing import Any

ACCESS_LOGGER = "serve.gateway.access"


def log_config(level: str) -> dict[str, Any]:
    """The dictConfig for a gateway process at ``level`` (e.g. ``INFO``)."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
            "json_lines": {"format": "%(message)s"},
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"},
            "access": {
                "class": "logging.StreamHandler",
                "formatter": "json_lines",
                "stream": "ext://sys.stderr",
            },
        },
        "loggers": {
            ACCESS_LOGGER: {"handlers": ["access"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
        },
        "root": {"handlers": ["stderr"], "level": level},
    }
