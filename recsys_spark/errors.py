"""The project's named errors, in one place.

Every error a user can cause (bad input, bad config, a missing table) is a ``RecsysError``; the CLI
prints its message as one line and exits non-zero. ``ValueError``/``TypeError`` remain for
programming mistakes in library calls.
"""

from __future__ import annotations


class RecsysError(Exception):
    """Base of every error the CLI reports as a one-line message."""

    exit_code = 1


class ConfigError(RecsysError):
    """The configuration has an unknown key, a wrong type or an impossible value."""

    exit_code = 2


class UsageError(RecsysError):
    """The command line asks for something the command cannot do (exit code 2, as argparse)."""

    exit_code = 2


class InputDataError(RecsysError):
    """An input file is missing, empty, of the wrong format, or has nothing that parses."""


class TableNameError(RecsysError, ValueError):
    """A table name is not ``<layer>/<name>`` with a known layer."""

    exit_code = 2


class TableNotFoundError(RecsysError):
    """A table was read before anything wrote it."""


class TableUnreadableError(RecsysError):
    """A table's Delta log or the data files of its newest version are damaged."""


class SchemaMismatchError(RecsysError):
    """Data appended to a table does not have the table's columns and types."""


class CommitFailedError(RecsysError):
    """A Delta commit could not be made; nothing of that write is visible."""


class UnsupportedTableFeatureError(RecsysError):
    """A table uses a Delta feature the active storage engine cannot read correctly."""


class EngineUnavailableError(RecsysError):
    """The configured storage engine cannot run in this Spark session."""


class ModelIntegrityError(RecsysError):
    """A registered model's files differ from those recorded at its registration."""


class TrackingUnavailableError(RecsysError):
    """The MLflow tracking store cannot be reached."""


class RegistryError(RecsysError):
    """The model registry does not hold what was asked for."""


class TrainingFailedError(RecsysError):
    """A DDP rank failed; its traceback is in the log."""


class NoChampionError(RecsysError):
    """The registry has no champion to serve."""


class StreamFailedError(RecsysError):
    """The nearline query stopped on an error; its cause is in the message and the log."""


class StreamAlreadyRunningError(RecsysError):
    """Another nearline query holds the checkpoint's lock."""


class KafkaUnavailableError(RecsysError):
    """The Kafka cluster cannot be reached, or refused a topic operation or a message."""


class BrokerError(RecsysError):
    """The local Kafka broker (``recsys broker``) cannot be started or stopped."""
