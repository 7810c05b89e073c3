"""Where documents come from: text files, jsonl files, or the built-in Wikipedia sample.

Every source is read the same way: `iter_documents(data_cfg)` yields one `str` per document, in a
fixed order (sorted paths, file order), so that two passes over a corpus see the same documents.
`input_files(data_cfg)` lists the files a source reads; their sizes and modification times go into
the fingerprint that tells `msllm prep` whether the shards are up to date.
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import zstandard

from msllm.config import DataConfig
from msllm.data.manifest import is_remote, remote_cache_root, staging_folder
from msllm.errors import DataError

# The shortened English Wikipedia dump that gensim ships with its tests (CC BY-SA).
WIKIPEDIA_SAMPLE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def input_files(data_cfg: DataConfig) -> list[Path]:
    """The files a source reads, sorted; a DataError if a path or glob matches nothing.

    What msllm itself writes (data.shards_dir, prep's staging folder beside it, data.cache_dir) is
    never corpus: a glob that covers it (`data/**`) skips those files, so that a rerun reads the
    same corpus as the first run; a path that names such a file is refused."""
    if data_cfg.source == "wikipedia-sample":
        return [_wikipedia_sample_path()]
    if data_cfg.source not in ("text", "jsonl"):
        raise DataError(f"data.source {data_cfg.source!r} has no input files to read")
    if not data_cfg.paths:
        raise DataError(f"data.source {data_cfg.source!r} needs files or globs in data.paths")
    written_by_msllm = _folders_msllm_writes(data_cfg)
    files: list[Path] = []
    for pattern in data_cfg.paths:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            corpus = [p for p in matches if _inside(p, written_by_msllm) is None]
            if not corpus:
                outside = " outside data.shards_dir and data.cache_dir, which msllm writes" if matches else ""
                raise DataError(f"data.paths: the glob {pattern!r} matches no files{outside}")
            files.extend(Path(p) for p in corpus)
        elif os.path.isfile(expanded):
            folder = _inside(expanded, written_by_msllm)
            if folder is not None:
                raise DataError(
                    f"data.paths: {pattern} is inside {folder}, which msllm writes (data.shards_dir or "
                    "data.cache_dir): move the corpus out of it"
                )
            files.append(Path(expanded))
        elif os.path.isdir(expanded):
            raise DataError(f"data.paths: {pattern!r} is a folder; give files or a glob such as '{pattern}/*.txt'")
        else:
            raise DataError(f"data.paths: no such file: {pattern}")
    # The same file named twice (by two globs) would be read twice: keep the first mention.
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique


def _folders_msllm_writes(data_cfg: DataConfig) -> list[Path]:
    folders = [remote_cache_root(data_cfg), staging_folder(data_cfg)]
    if not is_remote(data_cfg.shards_dir):
        folders.append(Path(data_cfg.shards_dir))
    return [folder.resolve() for folder in folders]


def _inside(path: str, folders: list[Path]) -> Path | None:
    """The folder of `folders` that holds `path` (or its staging lock file), or None."""
    resolved = Path(path).resolve()
    for folder in folders:
        if resolved.is_relative_to(folder) or resolved == folder.with_name(folder.name + ".lock"):
            return folder
    return None


def iter_documents(data_cfg: DataConfig) -> Iterator[str]:
    """Yield the documents of the recipe's source, one string each, skipping empty ones."""
    if data_cfg.source == "wikipedia-sample":
        yield from wikipedia_sample_documents()
        return
    decode_errors = DecodeErrorCounter(data_cfg.on_decode_error)
    for path in input_files(data_cfg):
        if data_cfg.source == "text":
            yield from _text_documents(path, data_cfg.split_on_blank_lines, decode_errors)
        else:
            yield from _jsonl_documents(path, data_cfg.text_field, decode_errors)
    decode_errors.report()


class DecodeErrorCounter:
    """Documents that are not UTF-8 text (bytes that are not UTF-8, or a lone surrogate that a JSON
    escape such as "\\ud800" makes and UTF-8 cannot encode): fail at the first one, or skip the
    document and count it."""

    BYTES = "bytes that are not UTF-8"

    def __init__(self, policy: str):
        self.policy = policy
        self.skipped: dict[str, dict[Path, int]] = {}  # what was wrong -> file -> documents skipped

    def bad(self, path: Path, where: str, what: str = BYTES, detail: str = "") -> None:
        """`what`: the kind of fault (the skip report counts by kind); `detail`: more about this one."""
        if self.policy == "fail":
            raise DataError(f"{where}: {what}{detail}; fix the file or set data.on_decode_error: skip")
        counts = self.skipped.setdefault(what, {})
        counts[path] = counts.get(path, 0) + 1

    def report(self) -> None:
        for what, skipped in self.skipped.items():
            total = sum(skipped.values())
            files = ", ".join(f"{p} ({n})" for p, n in skipped.items())
            message = f"msllm prep: skipped {total} document(s) with {what}: {files}"
            if message not in _reported:  # prep reads the corpus more than once: say it once
                _reported.add(message)
                print(message)


_reported: set[str] = set()


def _text_documents(path: Path, split_on_blank_lines: bool, errors: DecodeErrorCounter) -> Iterator[str]:
    with _reading(path), _open_binary(path) as f:
        raw = f.read()
    if not split_on_blank_lines:
        text = _decode(raw, path, str(path), errors)
        if text is not None and text.strip():
            yield text.strip()
        return
    # Decode each blank-line-separated block on its own, so that one bad byte costs one document.
    for block in re.split(rb"\r?\n(?:[ \t]*\r?\n)+", raw):
        text = _decode(block, path, str(path), errors)
        if text is not None and text.strip():
            yield text.strip()


def _jsonl_documents(path: Path, text_field: str, errors: DecodeErrorCounter) -> Iterator[str]:
    with _reading(path), _open_binary(path) as f:
        for line_number, raw_line in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            line = _decode(raw_line, path, where, errors)
            if line is None or not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise DataError(
                    f"{where}: JSON nested too deeply to read (thousands of levels): fix the record"
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(list(record)[:5]) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{where}: no field {text_field!r} (has: {keys}); set data.text_field to the "
                    "field that holds the text"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
            surrogate = _lone_surrogate(text)
            if surrogate is not None:  # the split's hash and every tokenizer encode the text as UTF-8
                errors.bad(
                    path,
                    where,
                    "a lone surrogate",
                    f" ({surrogate}) in field {text_field!r}, which UTF-8 cannot encode",
                )
            elif text.strip():
                yield text


def _lone_surrogate(text: str) -> str | None:
    """The first lone surrogate of `text` as its JSON escape (e.g. \\ud800), or None if `text` is
    Unicode text that UTF-8 can encode (json.loads pairs a valid surrogate pair into one character)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"\\u{ord(text[exc.start]):04x}"
    return None


def _decode(raw: bytes, path: Path, where: str, errors: DecodeErrorCounter) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        errors.bad(path, where)
        return None


def _open_binary(path: Path) -> io.BufferedIOBase:
    """Open an input file, decompressing .gz and .zst by their suffix."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if path.suffix == ".zst":
        return io.BufferedReader(_ZstdReader(path))
    return path.open("rb")


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame, with an EOFError if the file ends
    inside a frame: zstandard's stream_reader returns a truncated file's first part as if it were
    all of it."""

    def __init__(self, path: Path):
        self._decompressor = zstandard.ZstdDecompressor()
        self._file = path.open("rb")
        self._frame = self._decompressor.decompressobj()
        self._ready = b""
        self._in_frame = False  # compressed bytes of the current frame were read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._ready:
            if self._frame.eof:  # a frame ended: what follows it is the next frame
                rest, self._frame, self._in_frame = self._frame.unused_data, self._decompressor.decompressobj(), False
                chunk = rest
            else:
                chunk = self._file.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._in_frame = True
            self._ready = self._frame.decompress(chunk)
        n = min(len(buffer), len(self._ready))
        buffer[:n], self._ready = self._ready[:n], self._ready[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn what reading (and decompressing) `path` can raise into one line naming the file: a
    truncated .gz ends in EOFError, one that is not gzip raises BadGzipFile, corrupt compressed
    data zlib's or zstandard's error."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError) as exc:
        raise DataError(
            f"{path}: cannot decompress it, it is truncated or corrupt ({exc}): fix or replace the file"
        ) from None
    except OSError as exc:  # the disk's own errors
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None


# ----------------------------------------------------------------------------------------------
# The built-in corpus
# ----------------------------------------------------------------------------------------------


def _wikipedia_sample_path() -> Path:
    try:
        import gensim  # noqa: PLC0415 (optional and heavy: gensim, the [corpus] extra)
    except ImportError:
        raise DataError(
            "data.source wikipedia-sample reads gensim's test data: pip install 'msllm[corpus]' (or pip install gensim)"
        ) from None
    path = Path(gensim.__file__).parent / WIKIPEDIA_SAMPLE
    if not path.is_file():
        raise DataError(f"gensim {gensim.__version__} does not ship the Wikipedia sample at {path}")
    return path


@lru_cache(maxsize=1)
def _wikipedia_sample_cached() -> tuple[str, ...]:
    # Stripping the markup takes a few seconds; prep reads the corpus twice (tokenizer, shards).
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki  # noqa: PLC0415 (optional and heavy: gensim, the [corpus] extra)

    articles = []
    with bz2.open(_wikipedia_sample_path(), "rb") as dump:
        for _title, wikitext, _page_id in extract_pages(dump):
            if wikitext.lstrip().lower().startswith("#redirect"):
                continue
            text = _tidy_wiki_text(filter_wiki(wikitext))
            if text:
                articles.append(text)
    return tuple(articles)


def wikipedia_sample_documents() -> list[str]:
    """The 106 articles of gensim's Wikipedia sample as plain text, one document per article."""
    return list(_wikipedia_sample_cached())


def _tidy_wiki_text(text: str) -> str:
    """filter_wiki leaves bold/italic quote marks and runs of blank lines: remove them."""
    text = re.sub(r"'{2,}", "", text)
    lines = [line.strip() for line in text.splitlines()]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()
