"""Peer proxies the bench compares proxycore with (besides nginx, which is configured)."""
