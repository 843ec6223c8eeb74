"""Pretraining data: an embedded byte-level corpus as a TFDS array_record dataset, read by step.

**The embedded corpus** (``data="stdlib"``): the running interpreter's standard-library ``.py``
sources, as bytes (vocab 256; one token = one byte, so loss / ln 2 is bits per byte). It needs no
download. :class:`StdlibBytes` is a TFDS ``GeneratorBasedBuilder`` with ``file_format="array_record"``
that packs the files, in sorted order, into fixed rows of ``seq_len + 1`` bytes with ``segment_ids``
(1, 2, ... per document fragment within a row), once, into ``data_dir`` (``~/.cache/seqjax``). About 2%
of the files (chosen by a hash of their path) form the held-out ``validation`` split. It works with
tensorflow-datasets and no TensorFlow installed (checked by ``tests/test_data.py``).

**Real datasets** (``data="tfds:<name>[:<feature>]"``, e.g. ``tfds:lm1b``): read through
``tfds.data_source`` (prepared array_record on local disk) and packed on the fly by look-ahead:
row ``i`` starts with document ``i`` and is filled with the following documents (in shuffled order),
each truncated to fit, so any row is a pure function of its index.

**Indexing by global step.** The rows of step ``s`` are ``perm[s*B : (s+1)*B]`` of a grain
``MapDataset.range(n).seed(seed).shuffle().repeat()`` permutation, so resuming needs only the step,
on any number of hosts. Each process reads only the rows its devices hold
(:meth:`Batches.global_batch` assembles the global ``jax.Array`` with ``make_array_from_callback``).

A row ``r`` of ``seq_len + 1`` bytes gives ``inputs = r[:-1]``, ``targets = r[1:]``,
``segment_ids = seg[:-1]`` and ``weights = (seg[1:] == seg[:-1])``: the first byte of a document is
never predicted from the previous one. ``positions`` restart at 0 in each segment.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import sys
import sysconfig

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

__all__ = ["StdlibBytes", "stdlib_files", "prepare_stdlib", "load_source", "Batches", "local_rows", "split_row", "positions_from_segments"]

VALID_FRACTION = 0.02


def default_data_dir(data_dir: str = "") -> str:
    return os.path.expanduser(data_dir or os.path.join("~", ".cache", "seqjax"))


def stdlib_files() -> list[tuple[str, bool]]:
    """``(path, is_validation)`` for every ``.py`` file of the interpreter's stdlib, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__"))
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), root)
                h = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) / 16**8
                out.append((os.path.join(d, f), h < VALID_FRACTION))
    return out


def pack_documents(docs, row_len: int):
    """Concatenate byte documents and cut into ``[n, row_len]`` rows with per-row segment ids.

    The final partial row is dropped. Segment ids count the document fragments of a row from 1.
    """
    docs = [np.frombuffer(d, np.uint8) for d in docs if len(d)]
    if not docs:
        return np.zeros((0, row_len), np.uint8), np.zeros((0, row_len), np.uint16)
    tokens = np.concatenate(docs)
    doc_id = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    n = len(tokens) // row_len
    tokens = tokens[: n * row_len].reshape(n, row_len)
    doc_id = doc_id[: n * row_len].reshape(n, row_len)
    starts = np.concatenate([np.ones((n, 1), bool), doc_id[:, 1:] != doc_id[:, :-1]], axis=1)
    return tokens, np.cumsum(starts, axis=1).astype(np.uint16)


class StdlibBytes(tfds.core.GeneratorBasedBuilder):
    """The interpreter's stdlib sources as packed byte rows (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = []  # one config per (python version, row length), made on demand
    # No download checksums to find next to the code (TFDS would otherwise probe the package's
    # resources, which needs `importlib_resources` for editable installs).
    code_path = None

    def __init__(self, *, seq_len: int = 256, max_files: int = 0, **kwargs):
        tag = f"py{sys.version_info[0]}{sys.version_info[1]}_s{seq_len}" + (f"_n{max_files}" if max_files else "")
        self._max_files = max_files
        config = tfds.core.BuilderConfig(name=tag, description=f"rows of {seq_len + 1} bytes")
        self._row_len = seq_len + 1
        super().__init__(config=config, file_format="array_record", **kwargs)

    def _info(self):
        enc = tfds.features.Encoding.BYTES
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            disable_shuffling=True,  # rows stay in corpus order; Batches shuffles by step
            features=tfds.features.FeaturesDict(
                {
                    "tokens": tfds.features.Tensor(shape=(self._row_len,), dtype=np.uint8, encoding=enc),
                    "segment_ids": tfds.features.Tensor(shape=(self._row_len,), dtype=np.uint16, encoding=enc),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        files = stdlib_files()
        if self._max_files:
            files = files[: self._max_files]
            if not any(v for _, v in files):  # keep a held-out split even in tiny corpora
                files[-1] = (files[-1][0], True)
        return {
            "train": self._generate_examples([p for p, v in files if not v]),
            "validation": self._generate_examples([p for p, v in files if v]),
        }

    def _generate_examples(self, paths):
        docs = []
        for p in paths:
            with open(p, "rb") as f:
                docs.append(f.read())
        tokens, seg = pack_documents(docs, self._row_len)
        for i in range(len(tokens)):
            yield i, {"tokens": tokens[i], "segment_ids": seg[i]}


def prepare_stdlib(seq_len: int, data_dir: str = "", max_files: int = 0):
    """Build (once) and return ``{"train": source, "validation": source}`` of the embedded corpus."""
    builder = StdlibBytes(seq_len=seq_len, max_files=max_files, data_dir=default_data_dir(data_dir))
    if not builder.is_prepared():
        tfds.disable_progress_bar()
        builder.download_and_prepare()
    return builder.as_data_source()


class _LookaheadPacked:
    """Random-access packed rows over a TFDS text source (row i = docs i, i+1, ... of one order)."""

    def __init__(self, source, row_len: int, feature: str, perm: np.ndarray, max_docs: int = 64):
        self.source, self.row_len, self.feature, self.perm, self.max_docs = source, row_len, feature, perm, max_docs

    def __len__(self):
        return len(self.perm)

    def _doc(self, i):
        x = self.source[int(self.perm[i % len(self.perm)])][self.feature]
        return x.encode() if isinstance(x, str) else bytes(x)

    def __getitem__(self, i):
        tokens = np.zeros(self.row_len, np.uint8)
        seg = np.zeros(self.row_len, np.uint16)
        pos = 0
        for k in range(self.max_docs):
            d = np.frombuffer(self._doc(i + k), np.uint8)[: self.row_len - pos]
            tokens[pos : pos + len(d)] = d
            seg[pos : pos + len(d)] = k + 1
            pos += len(d)
            if pos == self.row_len:
                break
        return {"tokens": tokens, "segment_ids": seg}

    def __getitems__(self, idx):
        return [self[i] for i in idx]


def load_source(data: str, seq_len: int, data_dir: str = "", seed: int = 0, max_files: int = 0):
    """``{"train", "validation"}`` random-access sources of ``{"tokens", "segment_ids"}`` rows."""
    if data == "stdlib":
        return prepare_stdlib(seq_len, data_dir, max_files)
    if data.startswith("tfds:"):
        parts = data.split(":")
        name, feature = parts[1], (parts[2] if len(parts) > 2 else "text")
        src = tfds.data_source(name, data_dir=data_dir or None)
        valid = next((s for s in ("validation", "test") if s in src), None)
        out = {}
        for split, key in (("train", "train"), ("validation", valid)):
            n = len(src[key])
            perm = np.random.default_rng(seed).permutation(n)
            out[split] = _LookaheadPacked(src[key], seq_len + 1, feature, perm)
        return out
    raise ValueError(f"data must be 'stdlib' or 'tfds:<name>[:<feature>]', got {data!r}")


def positions_from_segments(seg: np.ndarray) -> np.ndarray:
    """Position of each token within its segment, ``[..., t]``."""
    t = np.arange(seg.shape[-1])
    starts = np.concatenate([np.ones_like(seg[..., :1], bool), seg[..., 1:] != seg[..., :-1]], axis=-1)
    start_pos = np.maximum.accumulate(np.where(starts, t, 0), axis=-1)
    return (t - start_pos).astype(np.int32)


def split_row(tokens: np.ndarray, seg: np.ndarray) -> dict:
    """Rows ``[..., L+1]`` -> model inputs/targets ``[..., L]`` (see the module docstring)."""
    tokens = tokens.astype(np.int32)
    seg = seg.astype(np.int32)
    s_in = seg[..., :-1]
    return {
        "inputs": tokens[..., :-1],
        "targets": tokens[..., 1:],
        "segment_ids": s_in,
        "positions": positions_from_segments(s_in),
        "weights": ((seg[..., 1:] == s_in) & (s_in > 0)).astype(np.float32),
    }


def local_rows(sharding, shape, devices=None) -> np.ndarray:
    """Sorted global row indices that ``devices`` (default: this process's) hold under ``sharding``."""
    idx_map = sharding.devices_indices_map(tuple(shape))
    devices = set(sharding.addressable_devices if devices is None else devices)
    rows = {r for dev, index in idx_map.items() if dev in devices for r in range(*index[0].indices(shape[0]))}
    return np.asarray(sorted(rows), np.int64)


class Batches:
    """Global batches of a source, as a pure function of the step.

    ``rows(step)`` are the global row indices; ``numpy(step)`` the whole global batch on this host;
    ``global_batch(step, sharding)`` the sharded ``jax.Array`` dict, reading only the rows this
    process's devices hold. With ``shuffle=False`` rows are taken in order (for evaluation).
    """

    def __init__(self, source, global_batch: int, *, seed: int = 0, shuffle: bool = True, prefetch: int = 2):
        self.source = source
        self.batch = global_batch
        index = grain.MapDataset.range(len(source))
        if shuffle:
            index = index.seed(seed).shuffle()
        self.index = index.repeat()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1) if prefetch else None
        self._pending: dict = {}
        self.prefetch = prefetch

    def rows(self, step: int) -> np.ndarray:
        return np.asarray([self.index[step * self.batch + j] for j in range(self.batch)], np.int64)

    def _read(self, step: int, local_rows) -> dict:
        idx = self.rows(step)[local_rows]
        recs = self.source.__getitems__([int(i) for i in idx])
        tokens = np.stack([r["tokens"] for r in recs])
        seg = np.stack([r["segment_ids"] for r in recs])
        return split_row(tokens, seg)

    def numpy(self, step: int) -> dict:
        return self._read(step, np.arange(self.batch))

    def global_batch(self, step: int, sharding: jax.sharding.Sharding, seq_len: int) -> dict:
        """The batch of ``step`` as global arrays ``[B, seq_len]`` laid out by ``sharding``."""
        key = (step, id(sharding))
        fut = self._pending.pop(key, None)
        local = fut.result() if fut is not None else self._local(step, sharding, seq_len)
        if self._pool is not None:
            for k in range(1, self.prefetch + 1):
                nk = (step + k, id(sharding))
                if nk not in self._pending:
                    self._pending[nk] = self._pool.submit(self._local, step + k, sharding, seq_len)
        rows_here, data = local
        pos = {int(r): i for i, r in enumerate(rows_here)}
        shape = (self.batch, seq_len)

        def build(name):
            def cb(index):
                rs = range(*index[0].indices(self.batch))
                return data[name][[pos[r] for r in rs]][:, index[1]]

            return jax.make_array_from_callback(shape, sharding, cb)

        return {name: build(name) for name in data}

    def _local(self, step: int, sharding, seq_len: int):
        rows_here = local_rows(sharding, (self.batch, seq_len))
        return rows_here, self._read(step, rows_here)

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
