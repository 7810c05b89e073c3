"""Tokenizers: sentencepiece (train one on the train split, or reuse a given `.model`), or bytes.

Every tokenizer has the same special ids, so that the model and the shards agree on them without
looking: pad=0, unk=1, bos=2, eos=3.

- sentencepiece (data.tokenizer.type unigram | bpe): Llama's choices of normalisation (`identity`,
  keep whitespace as it is, byte fallback by default), so that decoding the tokens of a text gives
  the text back.
- bytes (data.tokenizer.type bytes): the UTF-8 bytes of the text, byte b -> id 4 + b, 260 ids in
  all; nothing to train. Its "tokenizer file" is a small JSON descriptor (BYTES_DESCRIPTOR), so
  that shards, checkpoints and exports carry and hash it exactly as they do a `.model` file.

Everything else reads a tokenizer through one small interface (`load_tokenizer_file(path)`):
`encode(texts, add_eos)`, `decode(ids)`, `vocab_size`, `special_ids()`, `bytes_per_token()`, `kind`.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from msllm.config import BYTES_VOCAB_SIZE, TokenizerConfig
from msllm.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TOKENIZER_FILENAME = "tokenizer.model"  # the sentencepiece model, or the bytes descriptor

BYTE_OFFSET = 4  # byte b has id BYTE_OFFSET + b: the special ids come first (BYTES_VOCAB_SIZE = 260 ids)
BYTES_DESCRIPTOR = (
    json.dumps({"type": "bytes", "byte_offset": BYTE_OFFSET, "vocab_size": BYTES_VOCAB_SIZE}) + "\n"
).encode()

# sentencepiece skips training lines longer than this (bytes); Wikipedia paragraphs can be long.
MAX_SENTENCE_BYTES = 1 << 16


def train_tokenizer(
    train_documents: Iterable[str], cfg: TokenizerConfig, out_path: Path, num_threads: int, seed: int = 0
) -> None:
    """Train a sentencepiece model on the documents (one training "sentence" per non-empty line).

    sentencepiece trains in a child process that this one feeds the lines through a pipe: once it
    has read them, its C++ trainer does not return to Python until it is done (a minute and more on
    a large corpus), so a Ctrl-C here waited that long; the child is killed at once instead. The
    caller gives a temporary `out_path`: a child killed mid-write leaves no model under the real name."""
    options = dict(
        model_type=cfg.type,
        vocab_size=cfg.vocab_size,
        byte_fallback=cfg.byte_fallback,
        character_coverage=cfg.character_coverage,
        input_sentence_size=cfg.input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=MAX_SENTENCE_BYTES,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=num_threads,
        minloglevel=2,  # warnings and errors only: prep shows its own progress
    )
    context = multiprocessing.get_context("spawn")  # never a fork of a process that may hold threads
    lines_in, lines_out = context.Pipe(duplex=False)
    result_in, result_out = context.Pipe(duplex=False)
    child = context.Process(
        target=_train_in_child, args=(lines_in, result_out, options, str(out_path), seed), daemon=True
    )
    child.start()
    lines_in.close()
    result_out.close()
    try:
        try:
            batch: list[str] = []
            for line in _lines(train_documents):  # the corpus's own errors are raised here, in this process
                batch.append(line)
                if len(batch) == _LINES_PER_MESSAGE:
                    lines_out.send(batch)
                    batch = []
            lines_out.send(batch)
            lines_out.send(None)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the child stopped reading: its result says why
        lines_out.close()
        try:
            outcome = result_in.recv()
        except EOFError:  # it died without a word (killed: out of memory?)
            child.join()
            outcome = ("died", child.exitcode)
        child.join()
    finally:
        if child.is_alive():  # this process failed or was interrupted (Ctrl-C): the child stops now
            child.kill()
            child.join()
    if outcome is None:
        return
    kind, detail = outcome
    if kind == "os":
        raise OSError(*detail)  # a full disk: prep names the file
    if kind == "died":
        raise DataError(
            f"sentencepiece's training process ended without a model (exit {detail}; killed for lack of memory?): "
            "lower data.tokenizer.input_sentence_size"
        )
    raise _explain_training_error(RuntimeError(detail), cfg)


_LINES_PER_MESSAGE = 4096  # lines sent to the training process at a time


def _lines(documents: Iterable[str]) -> Iterator[str]:
    for document in documents:
        for line in document.splitlines():
            if line.strip():
                yield line


def _train_in_child(lines, result, options: dict, out_path: str, seed: int) -> None:
    """The training process of `train_tokenizer`: sentencepiece on the lines received, the model
    written to `out_path`; sends None, or (kind, detail) of its failure."""
    import signal  # noqa: PLC0415 (only in the training process)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the whole group: the parent decides

    def received() -> Iterator[str]:
        while (batch := lines.recv()) is not None:
            yield from batch

    spm.set_random_generator_seed(seed)  # sentencepiece samples input_sentence_size lines at random
    try:
        with open(out_path, "wb") as model_file:
            spm.SentencePieceTrainer.train(sentence_iterator=received(), model_writer=model_file, **options)
    except OSError as exc:
        result.send(("os", (exc.errno, exc.strerror, exc.filename)))
    except (RuntimeError, ValueError) as exc:  # sentencepiece's errors
        result.send(("sentencepiece", str(exc)))
    else:
        result.send(None)


def _explain_training_error(exc: Exception, cfg: TokenizerConfig) -> DataError:
    message = str(exc)
    too_high = re.search(r"Vocabulary size (?:is )?too high \((\d+)\).*<= (\d+)", message)
    if too_high:
        largest = int(too_high.group(2))
        return DataError(
            f"data.tokenizer.vocab_size {cfg.vocab_size} is more than this corpus supports "
            f"(at most {largest} for a {cfg.type} model); set data.tokenizer.vocab_size to {largest} "
            "or less, or add text"
        )
    too_low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        needed = int(too_low.group(2))
        return DataError(
            f"data.tokenizer.vocab_size {cfg.vocab_size} is too small: this corpus needs at least "
            f"{needed} pieces (its characters, the special pieces"
            + (", 256 byte pieces for byte_fallback" if cfg.byte_fallback else "")
            + f"); set data.tokenizer.vocab_size to {needed} or more, or lower character_coverage"
        )
    first_line = message.strip().splitlines()[0] if message.strip() else repr(exc)
    return DataError(f"sentencepiece could not train the tokenizer: {first_line}")


def load_sentencepiece(path: str | Path) -> spm.SentencePieceProcessor:
    """A sentencepiece processor for a `.model` file, or a DataError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer model not found: {path}")
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError):
        raise DataError(f"{path} is not a sentencepiece model") from None
    return processor


def special_ids(processor: spm.SentencePieceProcessor) -> dict[str, int]:
    """The special ids of a tokenizer (-1 where it has none)."""
    return {
        "pad_id": processor.pad_id(),
        "unk_id": processor.unk_id(),
        "bos_id": processor.bos_id(),
        "eos_id": processor.eos_id(),
    }


def bytes_per_token(processor: spm.SentencePieceProcessor) -> np.ndarray:
    """UTF-8 bytes of text that each token id stands for (0 for control tokens, 1 for byte pieces).

    Summing it over tokens counts the bytes of text they decode to (up to sentencepiece's dummy
    prefix: the '▁' it puts before each document counts as one space).
    """
    table = np.zeros(processor.GetPieceSize(), dtype=np.int64)
    for token_id in range(processor.GetPieceSize()):
        if processor.IsControl(token_id) or processor.IsUnknown(token_id):
            continue
        if processor.IsByte(token_id):
            table[token_id] = 1
        else:
            table[token_id] = len(processor.IdToPiece(token_id).replace("\u2581", " ").encode("utf-8"))
    return table


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# The tokenizer interface: what prep, the shards check, generate and export read
# ----------------------------------------------------------------------------------------------


class SentencePieceTokenizer:
    """A sentencepiece model behind msllm's tokenizer interface."""

    kind = "sentencepiece"

    def __init__(self, processor: spm.SentencePieceProcessor):
        self.processor = processor
        self.vocab_size = processor.GetPieceSize()

    def encode(self, texts: list[str], add_eos: bool = False) -> list[list[int]]:
        return self.processor.encode(list(texts), add_eos=add_eos, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(list(ids))

    def special_ids(self) -> dict[str, int]:
        return special_ids(self.processor)

    def bytes_per_token(self) -> np.ndarray:
        return bytes_per_token(self.processor)


class ByteTokenizer:
    """UTF-8 bytes: byte b -> id BYTE_OFFSET + b, after the four special ids. Decoding drops the
    special ids and replaces an incomplete UTF-8 sequence (a sampled byte that does not continue
    one) by U+FFFD, so that any ids decode to text."""

    kind = "bytes"
    vocab_size = BYTES_VOCAB_SIZE

    def encode(self, texts: list[str], add_eos: bool = False) -> list[list[int]]:
        tail = [EOS_ID] if add_eos else []
        return [
            (np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) + BYTE_OFFSET).tolist() + tail
            for t in texts
        ]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < BYTES_VOCAB_SIZE).decode(
            "utf-8", errors="replace"
        )

    def special_ids(self) -> dict[str, int]:
        return {"pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID}

    def bytes_per_token(self) -> np.ndarray:
        table = np.zeros(BYTES_VOCAB_SIZE, dtype=np.int64)
        table[BYTE_OFFSET:] = 1
        return table


def load_tokenizer_file(path: str | Path) -> SentencePieceTokenizer | ByteTokenizer:
    """The tokenizer saved at `path` (a sentencepiece `.model` or the bytes descriptor), or a
    DataError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer model not found: {path}")
    with path.open("rb") as f:
        head = f.read(len(BYTES_DESCRIPTOR) + 1)
    if head.startswith(b"{"):
        if head != BYTES_DESCRIPTOR:
            raise DataError(
                f"{path} is neither a sentencepiece model nor msllm's bytes descriptor "
                f"{BYTES_DESCRIPTOR.decode().strip()}"
            )
        return ByteTokenizer()
    return SentencePieceTokenizer(load_sentencepiece(path))
