"""The one exception type a user should ever see from refusal_lab."""


class ConfigError(ValueError):
    """Bad input from the user: the message says what is wrong and how to fix it.

    Raised before any heavy work, so a mistyped option costs seconds, not a model load.
    """
