"""The split: a document goes to validation when the hash of its text is below a threshold, so
that the split never depends on the documents' order and a document is never in both splits."""

from __future__ import annotations

import dataclasses
import hashlib

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
    """The threshold is validation_fraction, moved just enough that neither split is empty."""
    corpus_bytes = 0
    seen = set()
    for text in iter_documents(data_cfg):
        seen.add(document_hash_fraction(text))
        corpus_bytes += len(text.encode("utf-8"))
    fractions = sorted(seen)
    where = describe_source(data_cfg)
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
    return SplitRule(threshold, corpus_bytes)
