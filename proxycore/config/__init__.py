"""Configuration: frozen dataclasses with units (``model``), validated by ``checks``; every
problem names the file, the key path and what is wrong."""

from .model import (
    AdminSettings,
    Config,
    ConfigError,
    Inbound,
    Inject,
    PoolSettings,
    RateLimit,
    Route,
    ServerSettings,
    SSESettings,
    Timeouts,
    Upstream,
    WebSocketSettings,
)

__all__ = [
    "AdminSettings",
    "Config",
    "ConfigError",
    "Inbound",
    "Inject",
    "PoolSettings",
    "RateLimit",
    "Route",
    "SSESettings",
    "ServerSettings",
    "Timeouts",
    "Upstream",
    "WebSocketSettings",
]
