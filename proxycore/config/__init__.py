"""Configuration: frozen dataclasses with units (``model``), validated by ``checks``, tied
together and loaded from TOML or legacy JSON by ``Config`` (``load``); every problem names the
file, the key path and what is wrong."""

from .checks import ConfigError, Upstream
from .load import Config
from .model import (
    AdminSettings,
    Inbound,
    Inject,
    PoolSettings,
    RateLimit,
    Route,
    ServerSettings,
    SSESettings,
    Timeouts,
    Tunnel,
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
    "Tunnel",
    "Upstream",
    "WebSocketSettings",
]
