"""The one error type bad input raises (a leaf: every module may import it, it imports nothing)."""


class ConfigError(ValueError):
    """A bad config value, path or checkpoint; the message says which and what is allowed."""
