"""Pretraining data: packing, the TFDS array_record stdlib corpus (no TensorFlow), step-indexed batches."""

import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import NamedSharding

from seqjax import sharding as shd
from seqjax.train import data as D
from seqjax.train.step import batch_spec


def test_pack_documents_is_lossless_with_segments():
    docs = [b"abcde", b"", b"fg", b"hijklmnopq"]
    tokens, seg = D.pack_documents(docs, 4)
    assert tokens.shape == (4, 4)  # 17 bytes -> 4 full rows, the last byte dropped
    assert bytes(tokens.reshape(-1)) == b"abcdefghijklmnop"
    np.testing.assert_array_equal(seg, [[1, 1, 1, 1], [1, 2, 2, 3], [1, 1, 1, 1], [1, 1, 1, 1]])


def test_split_row_targets_weights_positions():
    tokens = np.array([[10, 11, 12, 20, 21, 30]])
    seg = np.array([[1, 1, 1, 2, 2, 3]])
    b = D.split_row(tokens, seg)
    np.testing.assert_array_equal(b["inputs"], [[10, 11, 12, 20, 21]])
    np.testing.assert_array_equal(b["targets"], [[11, 12, 20, 21, 30]])
    # never predict a document's first byte from the previous document
    np.testing.assert_array_equal(b["weights"], [[1, 1, 0, 1, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 2]])


class _Source:
    def __init__(self, n, row_len=9):
        self.n, self.row_len = n, row_len

    def __len__(self):
        return self.n

    def __getitems__(self, idx):
        return [{"tokens": np.full(self.row_len, i % 256, np.uint8), "segment_ids": np.ones(self.row_len, np.uint16)} for i in idx]


def test_batches_are_a_function_of_the_step():
    src = _Source(50)
    a, b = D.Batches(src, 8, seed=3, prefetch=0), D.Batches(src, 8, seed=3)
    for step in (0, 5, 6, 7):  # 7: past one epoch (50 rows): the permutation repeats, reshuffled
        np.testing.assert_array_equal(a.numpy(step)["inputs"], b.numpy(step)["inputs"])
    rows = np.concatenate([a.rows(s) for s in range(6)])  # 48 rows of epoch 0: no repeats
    assert len(set(rows.tolist())) == 48
    assert not np.array_equal(a.rows(0), D.Batches(src, 8, seed=4).rows(0))
    np.testing.assert_array_equal(D.Batches(src, 8, shuffle=False).rows(1), np.arange(8, 16))
    b.close()


def test_each_process_reads_its_rows_and_global_batch_matches():
    """Rows held by two simulated processes (4 devices each) are disjoint and cover the batch."""
    mesh = shd.make_mesh((2, 2, 2, 1))
    sh = NamedSharding(mesh, batch_spec())
    devs = list(mesh.devices.reshape(-1))
    p0, p1 = D.local_rows(sh, (8, 4), devs[:4]), D.local_rows(sh, (8, 4), devs[4:])
    assert set(p0.tolist()).isdisjoint(p1.tolist())
    assert sorted(p0.tolist() + p1.tolist()) == list(range(8))
    src = _Source(40, row_len=5)
    bt = D.Batches(src, 8, seed=0)
    g = bt.global_batch(2, sh, 4)
    ref = bt.numpy(2)
    for k in ref:
        np.testing.assert_array_equal(np.asarray(g[k]), ref[k])
        assert g[k].sharding == sh
    bt.close()


def test_stdlib_corpus_via_tfds_without_tensorflow(tmp_path):
    code = f"""
import sys
from seqjax.train import data as D
src = D.prepare_stdlib(32, {str(tmp_path)!r}, max_files=12)
assert type(src["train"]).__name__ == "ArrayRecordDataSource", type(src["train"])
n_train, n_valid = len(src["train"]), len(src["validation"])
assert n_train > 10 and n_valid > 0, (n_train, n_valid)
r = src["train"][0]
assert r["tokens"].shape == (33,) and r["segment_ids"][0] == 1
files_train = [p for p, v in D.stdlib_files()[:11] if not v]
first = open(files_train[0], "rb").read()[:33]
assert bytes(r["tokens"]) == first, (bytes(r["tokens"]), first)
assert "tensorflow" not in sys.modules
print("ok", n_train, n_valid)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1].startswith("ok")


def test_unknown_data_name():
    with pytest.raises(ValueError, match="stdlib"):
        D.load_source("nope", 16)
