"""Small corpora and prepared datasets for the data tests (tests/test_data*.py)."""

from __future__ import annotations

import random
from pathlib import Path

from msllm.config import DataConfig, TokenizerConfig

# Syllables make words; words make sentences: text varied enough for a tokenizer, made in ms.
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "qu", "da", "fe", "gi", "ho"]


def make_documents(count: int, seed: int = 0, words: int = 120) -> list[str]:
    """`count` distinct documents of a few sentences and paragraphs, some non-ASCII."""
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    vocabulary += ["café", "naïve", "über", "3.14", "2024", "x=y+1"]
    documents = []
    for index in range(count):
        paragraphs = []
        for _ in range(rng.randint(1, 3)):
            sentence = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(words // 2, words)))
            paragraphs.append(sentence.capitalize() + ".")
        documents.append(f"Document {index}.\n" + "\n".join(paragraphs))
    return documents


def write_text_files(folder: Path, documents: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, text in enumerate(documents):
        path = folder / f"doc{index:04d}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def text_config(folder: Path, shards_dir: Path, **overrides) -> DataConfig:
    """A recipe data section for the text files in `folder`, small enough for tests."""
    settings = dict(
        source="text",
        paths=[str(folder / "*.txt")],
        shards_dir=str(shards_dir),
        seq_len=64,
        validation_fraction=0.1,
        workers=2,
        tokenizer=TokenizerConfig(vocab_size=360),
    )
    settings.update(overrides)
    return DataConfig(**settings)
