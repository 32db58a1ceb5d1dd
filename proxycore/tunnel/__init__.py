"""The reverse tunnel (docs/tunnel.md): ``protocol`` (the wire format, pure), ``sessions``
(sessions and their registry), ``gateway`` (the WebSocket side), ``http_api`` (the HTTP
side) and ``client`` (``proxycore tunnel``)."""
