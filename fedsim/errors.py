"""User-facing errors: each one becomes a single line on stderr and exit status 2."""


class FedsimError(Exception):
    """Bad input (config, data files, device replies) a user can fix; never a bug."""

    exit_code = 2


class RunInterrupted(FedsimError):
    """Ctrl-C: the run stopped at a round boundary, its outputs (and checkpoint) written."""

    exit_code = 130


class ConfigError(FedsimError):
    """A config key holds a value that is not allowed."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class DataError(FedsimError):
    """A data file or directory is missing, unreadable or malformed."""


class StorageError(FedsimError):
    """The run directory cannot be written (disk full, I/O error, a run already using it)."""
