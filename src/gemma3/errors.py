"""User-facing errors. Anything raised as a `Gemma3Error` is a problem with the user's input (a file, a flag,
a config, a dataset): the CLI prints its message on one line and exits with status 2, no traceback."""


class Gemma3Error(Exception):
    """Base class for errors caused by bad input; the message names what is wrong and where."""


class ConfigError(Gemma3Error, ValueError):
    """An invalid or unreadable model configuration; the message names the offending field."""


class CheckpointError(Gemma3Error, ValueError):
    """A weight file or checkpoint directory that cannot be used (corrupt, truncated, wrong model ...)."""
