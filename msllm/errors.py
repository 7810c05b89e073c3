"""Errors that reach the user as one line (the CLI prints them and exits non-zero), and the
helpers that keep a bad value in such a line short."""

import reprlib

# A bad value in a message is cut to one line, whatever it holds (a recipe may hold 100,000 values).
MAX_SHOWN_CHARS = 100
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, 60, 60


def short_repr(value: object) -> str:
    """repr(value) in at most MAX_SHOWN_CHARS characters (reprlib stops before building the repr
    of a huge value)."""
    return clip(_SHORT_REPR.repr(value))


def clip(text: str) -> str:
    """`text` cut to at most MAX_SHOWN_CHARS characters."""
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."


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


class RunFolderError(MsllmError):
    """A run folder that is in use by another training, or holds another run."""
