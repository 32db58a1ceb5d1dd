"""Pure HTTP/1.1 logic: no trio, no sockets (bytes and decisions only)."""
