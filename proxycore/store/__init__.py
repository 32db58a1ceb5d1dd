"""Shared state between replicas (``[state]``): Redis or Valkey through ``coredis``.

``backend`` (the connection: probe, reconnect, bounded calls, up/down), ``scripts`` (the Lua
of the shared limits), ``limits`` (a route's shared rate and stream limits), ``leases`` (this
replica's stream leases: renew, release), ``sessions`` (the tunnel-session directory),
``runtime`` (all of it as one task). Below ``security``: admission and the tunnel use it.
"""
