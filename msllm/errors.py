"""Errors that reach the user as one line (the CLI prints them and exits non-zero)."""


class MsllmError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class RecipeError(MsllmError):
    """A recipe (or an override) that is not valid."""


class DataError(MsllmError):
    """A corpus, tokenizer or shard that cannot be used."""


class CheckpointError(MsllmError):
    """A checkpoint that cannot be loaded or saved."""
