"""Configuration errors carry the offending flag's name in their message."""


class ConfigError(ValueError):
    """An invalid configuration value; the message names the CLI flag."""
