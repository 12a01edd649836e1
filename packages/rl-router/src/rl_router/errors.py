"""Errors callers of the router can catch."""


class RouterError(RuntimeError):
    """The router answered a request with an error (engine failure, bad request, no engines)."""
