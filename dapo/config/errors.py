"""The one error every config problem raises: the offending key is in its message."""


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""
