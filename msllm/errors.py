"""Errors that reach the user as one line (the CLI prints them and exits non-zero)."""


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
