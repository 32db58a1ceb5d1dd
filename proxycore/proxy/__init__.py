"""The proxy: preflight, the upstream exchange, relays, front ends (native, ASGI)."""
