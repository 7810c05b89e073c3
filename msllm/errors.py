"""Errors that reach the user as one line (the CLI prints them and exits non-zero), and the
helpers that keep a bad value in such a line short."""

import reprlib

# A bad value in a message is cut to one line, whatever it holds (a recipe may hold 100,000 values).
MAX_SHOWN_CHARS = 100
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, 60, 60


def short_repr(value: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """repr(value) in at most `limit` characters, built without the repr of a huge value (reprlib
    shortens what containers hold; a string is cut first)."""
    return clip(repr(value[:limit]) if isinstance(value, str) else _SHORT_REPR.repr(value), limit)


def clip(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """`text` cut to at most `limit` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for quoting
    another library's error inside msllm's one line."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class MsllmError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class RecipeError(MsllmError):
    """A recipe (or an override) that is not valid."""


class DataError(MsllmError):
    """A corpus, tokenizer or shard that cannot be used."""


class CheckpointError(MsllmError):
    """A checkpoint that cannot be loaded or saved."""


class LauncherError(MsllmError):
    """A launcher environment (torchrun, srun, the deepspeed launcher) that does not describe a job."""


class DivergenceError(MsllmError):
    """Training that stopped making sense: a loss that is not a finite number."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that would run code or import types no checkpoint holds: never loaded,
    never fallen back from silently."""


class ReshardError(CheckpointError):
    """A sound checkpoint that cannot be continued on this run's layout (ranks, dp x sp, ZeRO
    stage): the run stops and the checkpoint is kept as it is, never set aside as corrupt."""


class RunFolderError(MsllmError):
    """A run folder that is in use by another training, or holds another run."""


class KernelError(MsllmError):
    """A kernel (attention, loss) that cannot run here, or that failed its start-up check under
    train.kernel_check: strict."""


class PeerLostError(MsllmError):
    """Another rank of the job died or became unreachable mid-run: this rank stops too, and a rerun
    resumes from the last checkpoint."""
