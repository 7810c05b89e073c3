"""Write the tiny MDS shard folder of tests/unit/test_data_streaming_compat.py, and record how the
`streaming` that wrote it reads it back (order of a shuffled epoch, resumption state).

    python tests/streaming_shards/make_shards.py OUT

tests/streaming_shards/mosaicml-streaming-0.13.0/ was written by this script under
mosaicml-streaming 0.13.0 (the last upstream release); the test writes the same folder with the
installed distribution (streaming-community) and compares it, file by file, and reads the
committed one. Needs only streaming and numpy (no msllm): the columns, compression and hashes are
msllm's (msllm.data.prepare.write: TOKENS_COLUMN, SHARD_COMPRESSION, SHARD_HASHES; the test checks
that they still are), the layout is `msllm prep`'s (one sub-folder per part, joined by one merged
index.json).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

COLUMNS = {"tokens": "ndarray:int32"}
COMPRESSION = "zstd"
HASHES = ["sha1", "xxh64"]
SAMPLE_LEN = 17  # seq_len 16, + 1 for the labels
PARTS = 2
SAMPLES_PER_PART = 24
SIZE_LIMIT = 600  # bytes of raw shard: several shards per part
SEED = 17
CANONICAL_NODES = 2
RESUME_AFTER = 7


def sample(i: int) -> np.ndarray:
    """Sample i of the folder: token 0 is i itself, so a read sample names its place."""
    return ((i + np.arange(SAMPLE_LEN, dtype=np.int64) * 37 * (i % 5 + 1)) % 1000).astype(np.int32)


def write(out: Path) -> None:
    from streaming import MDSWriter
    from streaming.base.util import merge_index

    out.mkdir(parents=True)
    parts = []
    for part in range(PARTS):
        folder = out / f"part-{part:05}"
        with MDSWriter(
            out=str(folder), columns=COLUMNS, compression=COMPRESSION, hashes=HASHES, size_limit=SIZE_LIMIT
        ) as writer:
            for i in range(part * SAMPLES_PER_PART, (part + 1) * SAMPLES_PER_PART):
                writer.write({"tokens": sample(i)})
        parts.append(folder)
    logging.disable(logging.WARNING)
    try:
        merge_index([str(p / "index.json") for p in parts], str(out), keep_local=True)
    finally:
        logging.disable(logging.NOTSET)


def read(remote: Path, state: dict | None = None) -> tuple[list[int], dict]:
    """(token 0 of each sample of one shuffled epoch, in order, the dataset's resumption state
    after RESUME_AFTER samples), read by one process as msllm's loader reads (remote = the folder,
    hashes checked); `state`: resume from it first."""
    from streaming import StreamingDataset

    with tempfile.TemporaryDirectory() as local:
        dataset = StreamingDataset(
            remote=str(remote),
            local=local,
            shuffle=True,
            shuffle_seed=SEED,
            num_canonical_nodes=CANONICAL_NODES,
            batch_size=1,
            validate_hash="xxh64",
        )
        if state is not None:
            dataset.load_state_dict(state)
        order = []
        for s in dataset:
            order.append(int(s["tokens"][0]))
            assert np.array_equal(s["tokens"], sample(order[-1])), order[-1]
        saved = dataset.state_dict(RESUME_AFTER, from_beginning=True)
        del dataset
    return order, saved


def record(out: Path) -> dict:
    """How the installed streaming reads `out` (what the committed reading.json holds)."""
    from importlib import metadata

    order, state = read(out)
    resumed, _ = read(out, state)
    name = "streaming-community"
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        name, version = "mosaicml-streaming", metadata.version("mosaicml-streaming")
    return {"written_by": f"{name} {version}", "epoch_order": order, "state": state, "resumed_order": resumed}


if __name__ == "__main__":
    target = Path(sys.argv[1])
    write(target / "shards")
    (target / "reading.json").write_text(json.dumps(record(target / "shards"), indent=1) + "\n")
