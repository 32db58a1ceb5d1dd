"""proxycore's benchmark harness: ``python -m bench`` (see ``bench/README.md``).

Every scenario (``direct``, ``proxycore``, ``nginx``, ``fastapi``) runs against the
same simulated upstream in one invocation, interleaved per workload, with the proxy
under test pinned to one core and the upstream and load generator on the other.
"""
