"""The I/O edge: streams, TLS, the upstream pool, body pumps."""
