"""Configuration: frozen dataclasses with units (``model``), validated by ``checks``, tied
together and loaded from TOML or legacy JSON by ``Config`` (``load``); every problem names the
file, the key path and what is wrong."""

from .checks import ConfigError, Upstream
from .groups import HealthCheck, Outlier, RetryPolicy, UpstreamEntry, UpstreamSpec
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
from .state import StateSettings

__all__ = [
    "AdminSettings",
    "Config",
    "ConfigError",
    "HealthCheck",
    "Inbound",
    "Inject",
    "Outlier",
    "PoolSettings",
    "RateLimit",
    "RetryPolicy",
    "Route",
    "SSESettings",
    "ServerSettings",
    "StateSettings",
    "Timeouts",
    "Tunnel",
    "Upstream",
    "UpstreamEntry",
    "UpstreamSpec",
    "WebSocketSettings",
]
