"""Running it: the server, the process runner, the worker supervisor, admin."""
