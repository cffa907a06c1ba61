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
