"""Upstream groups at run time: the choice of an upstream (``balance``), each upstream's
state and the group's rules (``group``), active health checks (``health``) and MCP session
affinity (``affinity``). Below ``observe`` and ``proxy``: the upstream core asks a group."""
