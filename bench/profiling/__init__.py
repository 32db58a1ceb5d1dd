"""Profiling tools behind bench/README.md's CPU breakdown (issue 16); run by hand.

- ``cpu.sh TREE plain|full N [prefix...]``: CPU per keep-alive request of the proxycore in
  ``TREE`` (a checkout or ``git archive`` copy), pinned to core 0; hooks for profilers.
- ``sse_cpu.sh TREE STREAMS EVENTS``: CPU per SSE event and the client-seen delay.
- ``keepalive_client``: the sequential keep-alive client ``cpu.sh`` drives.
- ``spy_categories``: py-spy's raw stacks folded into the breakdown's categories.
- ``sse_latency``: what a proxy itself adds per SSE event, from kernel packet timestamps.
- ``stream_heap``: the Python heap per held SSE stream (tracemalloc), by what holds it.
"""
