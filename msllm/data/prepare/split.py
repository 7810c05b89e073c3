"""The split: a document goes to validation when the hash of its text is below a threshold, so
that the split never depends on the documents' order and a document is never in both splits."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator

import numpy as np

from msllm.config import DataConfig
from msllm.data.prepare.read import describe_source
from msllm.data.sources import iter_documents
from msllm.errors import DataError


def document_hash_fraction(text: str) -> float:
    """A number in [0, 1) fixed by the document's text: the split compares it to a threshold."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


@dataclasses.dataclass
class SplitRule:
    """Documents whose hash fraction is below `threshold` go to validation, the rest to train."""

    threshold: float
    corpus_bytes: int = 0  # UTF-8 bytes of all documents (the progress bar's total)

    def split_of(self, text: str) -> str:
        return "validation" if document_hash_fraction(text) < self.threshold else "train"


def choose_split_rule(data_cfg: DataConfig) -> SplitRule:
    """The threshold is validation_fraction, moved just enough that neither split is empty (one pass
    over the corpus)."""
    return SplitScan(data_cfg).finish()


class SplitScan:
    """The split rule, found in one pass over the corpus that may feed another reader on the way
    (the tokenizer's training: msllm.data.prepare.tokenize.train_while_splitting): `documents()`
    yields every document and records its hash; `finish()` reads what the reader left and gives the
    SplitRule (or the DataError of a corpus that cannot be split)."""

    def __init__(self, data_cfg: DataConfig):
        self.data_cfg = data_cfg
        self.fractions: set[float] = set()
        self.corpus_bytes = 0
        self.error: BaseException | None = None  # what reading the corpus raised (the reader may have wrapped it)
        self._documents = self._read()

    def _read(self) -> Iterator[str]:
        try:
            for text in iter_documents(self.data_cfg):
                self.fractions.add(document_hash_fraction(text))
                self.corpus_bytes += len(text.encode("utf-8"))
                yield text
        except GeneratorExit:
            raise
        except BaseException as exc:
            self.error = exc
            raise

    def documents(self) -> Iterator[str]:
        return self._documents

    def finish(self) -> SplitRule:
        for _ in self._documents:  # what the reader did not take
            pass
        fractions = sorted(self.fractions)
        data_cfg, where = self.data_cfg, describe_source(self.data_cfg)
        if not fractions:
            raise DataError(f"empty corpus: {where} holds no documents (only empty or skipped text)")
        if len(fractions) < 2:
            raise DataError(
                f"{where} holds a single distinct document, but train and validation each need one: add "
                "documents" + (" or set data.split_on_blank_lines: true" if data_cfg.source == "text" else "")
            )
        threshold = data_cfg.validation_fraction
        if fractions[0] >= threshold:  # validation would be empty: give it the lowest-hash document
            threshold = float(np.nextafter(fractions[0], 1.0))
        elif fractions[-1] < threshold:  # train would be empty: give it the highest-hash document
            threshold = fractions[-1]
        return SplitRule(threshold, self.corpus_bytes)
