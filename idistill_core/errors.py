"""Errors raised for bad input or bad configuration.

Every message is one line that names the thing (file, field, sample id, target), says what was
expected and what was found, and where possible how to fix it. Validation happens before any write.
"""


class IdistillError(ValueError):
    """Base class of every error idistill raises on purpose."""


class ConfigError(IdistillError):
    """A configuration field has an invalid value or an invalid combination."""


class DataError(IdistillError):
    """A pool or target file (or row) cannot be used."""


class ModelError(IdistillError):
    """A model spec cannot be resolved, or the architecture is not supported."""


class StoreError(IdistillError):
    """A persisted artefact (LanceDB table, checkpoint) does not match what the run expects."""


class NumericalError(IdistillError):
    """A computation produced non-finite values (NaN/Inf) for a named sample or stage."""


class OutputError(IdistillError):
    """An output file or folder cannot be written (bad path, no permission, not enough free disk)."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the process (raised by the CLI's and the main job's signal handlers).

    A BaseException, like KeyboardInterrupt, so no ``except Exception`` swallows it and stages keep what they
    committed (to resume from) instead of rolling back as they do on errors.
    """

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.name = signal.Signals(signum).name
