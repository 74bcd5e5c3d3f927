"""The one exception family for user errors: the CLI turns these into one line and exit status 2."""

__all__ = ["LoraJaxError", "ConfigError", "CheckpointFormatError", "DataError", "ConfigWarning"]


class LoraJaxError(ValueError):
    """Bad input from the user; the message names the value and the fix."""


class ConfigError(LoraJaxError):
    """A configuration value is invalid."""


class CheckpointFormatError(LoraJaxError):
    """A model, adapter or checkpoint on disk is missing, malformed or does not fit."""


class DataError(LoraJaxError):
    """A dataset file is missing, malformed or empty."""


class ConfigWarning(UserWarning):
    """A configuration that runs, but probably not as meant (e.g. a warmup longer than the run).
    The CLI prints it as one `lora-jax: warning:` line; `warnings.simplefilter("error",
    ConfigWarning)` turns it into an error."""
