"""The one exception module of trainerd.

Every error a user can meet derives from TrainerdError, and its message is the one
line trainerctl prints: it quotes the offending value and says what to do.
"""


class TrainerdError(Exception):
    """Base of every error trainerd reports to a user."""

    exit_code = 1


class ConfigError(TrainerdError):
    """A config value is wrong; the message names its path and what is valid."""

    exit_code = 2


class InputError(TrainerdError):
    """An input file (posts, pickle, CSV, JSON lines) is missing, broken or hostile."""

    exit_code = 2


class CorpusError(TrainerdError):
    """A corpus store is missing, incomplete or of another format version."""

    exit_code = 2


class ShmSpaceError(TrainerdError):
    """/dev/shm cannot hold the rings a job needs."""

    exit_code = 4


class RingError(TrainerdError):
    """A ring slot holds something other than what the consumer expected."""

    exit_code = 5


class PeerDiedError(TrainerdError):
    """A process on the other side of a ring or socket exited."""

    exit_code = 5


class WaitTimeout(TrainerdError):
    """A bounded wait ran past its deadline."""

    exit_code = 5


class CheckpointError(TrainerdError):
    """A checkpoint is missing, truncated, foreign or does not match the run."""

    exit_code = 6


class TrainingFailed(TrainerdError):
    """Training cannot go on (non-finite losses in a row, a failed device)."""

    exit_code = 7


class DaemonError(TrainerdError):
    """The daemon is not reachable, busy, or refused a request."""

    exit_code = 4
