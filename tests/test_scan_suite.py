"""SCAN: the generator against its grammar and a tiny reference interpreter, the splits against their definitions,
the encoder–decoder models (shapes, causality, padding, greedy decoding against teacher forcing), and two steps of
the experiment."""

import collections
import importlib.util
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqjax.models.encdec import EncoderDecoder, reverse_within
from seqjax.rnn import Seq2Seq
from seqjax.tasks import IGNORE
from seqjax.tasks import scan as S

L, R = "I_TURN_LEFT", "I_TURN_RIGHT"


def reference(cmd: str) -> list[str]:
    """A second interpreter, written from the paper's table by rewriting, not by the module's parser."""
    for conj, swap in ((" and ", False), (" after ", True)):
        if conj in cmd:
            a, b = (reference(p) for p in cmd.split(conj))
            return b + a if swap else a + b
    w = cmd.split()
    times = {"twice": 2, "thrice": 3}.get(w[-1], 1)
    w = w[:-1] if times > 1 else w
    act = [] if w[0] == "turn" else ["I_" + w[0].upper()]
    if len(w) == 1:
        return act * times
    turn = ["I_TURN_" + w[-1].upper()]
    if len(w) == 2:
        return (turn + act) * times
    return {"opposite": turn * 2 + act, "around": (turn + act) * 4}[w[1]] * times


@pytest.mark.parametrize("cmd,actions", [
    ("jump", ["I_JUMP"]),
    ("jump left", [L, "I_JUMP"]),
    ("jump around right", [R, "I_JUMP"] * 4),
    ("turn left twice", [L, L]),
    ("jump thrice", ["I_JUMP"] * 3),
    ("jump opposite left and walk thrice", [L, L, "I_JUMP"] + ["I_WALK"] * 3),
    ("jump opposite left after walk around left", [L, "I_WALK"] * 4 + [L, L, "I_JUMP"]),
    ("jump twice after walk left", [L, "I_WALK", "I_JUMP", "I_JUMP"]),
    ("turn around right", [R] * 4),
    ("turn opposite right thrice", [R] * 6),
    ("look right and turn left", [R, "I_LOOK", L]),
])
def test_interpreter_matches_hand_checked_examples(cmd, actions):
    assert S.interpret(cmd) == actions


def test_generator_yields_every_command_once_and_the_reference_reads_each_back():
    cmds = S.commands()
    assert len(cmds) == len(set(cmds)) == S.NUM_COMMANDS == 20_910
    lengths = []
    for c in cmds:
        a = S.interpret(c)
        assert a == reference(c), c
        lengths.append(len(a))
    assert max(lengths) == S.MAX_ACTIONS == 48 and min(lengths) == 1
    assert max(len(c.split()) for c in cmds) == S.MAX_WORDS
    assert 23 not in lengths  # the length split's gap: train <= 22, test >= 24


@pytest.mark.parametrize("cmd", ["turn", "walk twice twice", "walk and", "jump left opposite", "walk and run after look",
                                 "fly left", "walk  left", "around left", "walk opposite", ""])
def test_commands_outside_the_grammar_raise(cmd):
    with pytest.raises(ValueError, match="outside the SCAN grammar"):
        S.interpret(cmd)
    with pytest.raises(ValueError, match="outside the SCAN grammar"):
        S.encode(["walk", cmd])


def test_bad_split_and_widths_raise():
    with pytest.raises(ValueError, match="split='addprim_walk' is not one of"):
        S.split("addprim_walk")
    with pytest.raises(ValueError, match="too short"):
        S.encode(["walk around left thrice"], tgt_len=12)


# sizes of the released files of brendenlake/SCAN
@pytest.mark.parametrize("name,n_train,n_test", [("simple", 16_728, 4_182), ("length", 16_990, 3_920),
                                                 ("addprim_jump", 14_670, 7_706), ("around_right", 15_225, 4_476)])
def test_splits_have_the_released_sizes_and_no_overlap(name, n_train, n_test):
    train, test = S.split(name)
    assert (len(train), len(test)) == (n_train, n_test)
    assert not set(train) & set(test)
    assert len(set(test)) == len(test)


def test_splits_satisfy_their_definitions():
    train, test = S.split("length")
    assert max(len(S.interpret(c)) for c in train) == 22 and min(len(S.interpret(c)) for c in test) == 24
    train, test = S.split("addprim_jump")
    counts = collections.Counter(train)
    assert counts["jump"] == 1467 and abs(counts["jump"] / len(train) - 0.1) < 1e-3
    assert all("jump" not in c.split() for c in train if c != "jump")
    assert all("jump" in c.split() and c != "jump" for c in test)
    assert len(set(train)) - 1 + len(test) + 1 == S.NUM_COMMANDS  # every jump composition is tested
    train, test = S.split("around_right")
    assert not any("around right" in c for c in train)
    assert all(any(f"{u} around right" in c for u in S.PRIMITIVES) and "turn around right" not in c for c in test)
    assert any("around left" in c for c in train) and any(" right" in c for c in train)
    a, b = S.split("simple", seed=0), S.split("simple", seed=1)
    assert a == S.split("simple", seed=0) and a[1] != b[1] and set(a[0]) | set(a[1]) == set(S.commands())


def test_encode_and_exact_match():
    batch = S.encode(["jump twice after walk left", "turn around right"])
    np.testing.assert_array_equal(batch.inputs, [[4, 10, 13, 1, 6], [5, 9, 7, 0, 0]])
    ids = {a: S.TGT_VOCAB.index(a) for a in S.ACTIONS}
    want = [[ids[L], ids["I_WALK"], ids["I_JUMP"], ids["I_JUMP"], S.EOS],
            [ids[R]] * 4 + [S.EOS]]
    np.testing.assert_array_equal(batch.targets, want)
    assert S.decode_actions(batch.targets[0]) == S.interpret("jump twice after walk left")
    pred = np.array([want[0] + [7, 7], [ids[R]] * 4 + [ids[R], S.EOS, 0]])  # row 1 misses its end token
    np.testing.assert_array_equal(S.exact_match(pred, batch.targets), [True, False])
    np.testing.assert_array_equal(S.exact_match(np.array(want)[:, :4], batch.targets), [False, False])
    wide = S.encode(["walk"], src_len=3, tgt_len=4)
    np.testing.assert_array_equal(wide.targets, [[ids["I_WALK"], S.EOS, IGNORE, IGNORE]])
    assert S.decode_actions([ids["I_WALK"], S.PAD, IGNORE, -2]) == ["I_WALK", "<pad>"]  # nothing read after IGNORE


def test_exact_match_and_decode_actions_reject_bad_ids():
    ids = {a: S.TGT_VOCAB.index(a) for a in S.ACTIONS}
    with pytest.raises(ValueError, match=r"ids must be target token ids in \[0, 9\) or IGNORE \(-1\), got -2 at position 1"):
        S.decode_actions([ids["I_WALK"], -2, S.EOS])
    with pytest.raises(ValueError, match=r"got 9 at position 0"):
        S.decode_actions([9, S.EOS])
    targets = np.array([[ids["I_RUN"], S.EOS, IGNORE], [ids["I_RUN"], ids["I_RUN"], ids["I_RUN"]]])
    with pytest.raises(ValueError, match=r"targets row 1 has no EOS \(2\)"):
        S.exact_match(targets, targets)


# ----------------------------------------------------------------------------- models


def test_reverse_within_reverses_the_real_positions_only():
    x = jnp.arange(10.0).reshape(2, 5)
    y = reverse_within(x, jnp.array([3, 5]))
    np.testing.assert_array_equal(y, [[2, 1, 0, 3, 4], [9, 8, 7, 6, 5]])
    np.testing.assert_array_equal(reverse_within(y, jnp.array([3, 5])), x)


@pytest.fixture(scope="module", params=["attention", "lru"])
def encdec(request):
    return EncoderDecoder(14, 9, d_model=16, num_heads=2, enc_layers=1, dec_layers=2, encoder=request.param,
                          decoder=request.param, rngs=nnx.Rngs(0))


def test_encdec_shapes_causality_padding_and_greedy_decoding(encdec):
    rng = np.random.default_rng(0)
    src = jnp.asarray(rng.integers(1, 14, (3, 6)), jnp.int32)
    mask = jnp.arange(6)[None] < jnp.array([6, 4, 2])[:, None]
    src = jnp.where(mask, src, 0)
    tgt = jnp.asarray(rng.integers(3, 9, (3, 7)), jnp.int32)
    logits = encdec(src, tgt, mask)
    assert logits.shape == (3, 7, 9) and logits.dtype == jnp.float32
    # causal decoder: changing target token 4 leaves positions 0..3 unchanged and changes 4
    other = encdec(src, tgt.at[:, 4].set((tgt[:, 4] + 1 - 3) % 6 + 3), mask)
    np.testing.assert_allclose(other[:, :4], logits[:, :4], atol=1e-5)
    assert np.abs(other[:, 4:] - logits[:, 4:]).max() > 1e-3
    # padding: the masked source positions' tokens and two more pad columns change nothing
    noisy = jnp.where(mask, src, 5)
    wide = jnp.concatenate([noisy, jnp.full((3, 2), 7, jnp.int32)], 1)
    wide_mask = jnp.concatenate([mask, jnp.zeros((3, 2), bool)], 1)
    np.testing.assert_allclose(encdec(wide, tgt, wide_mask), logits, atol=1e-4)
    # but a real source token does
    assert np.abs(encdec(src.at[0, 0].set(src[0, 0] % 13 + 1), tgt, mask)[0] - logits[0]).max() > 1e-3
    # greedy decoding from the caches = teacher forcing on its own tokens
    toks, glog = encdec.generate(src, 8, 1, mask)
    assert toks.shape == (3, 8) and toks.dtype == jnp.int32
    tin = jnp.concatenate([jnp.ones((3, 1), jnp.int32), toks[:, :-1]], 1)
    np.testing.assert_allclose(glog, encdec(src, tin, mask), atol=1e-4)
    np.testing.assert_array_equal(toks, jnp.argmax(glog, -1))


def test_encdec_rejects_bad_input():
    with pytest.raises(ValueError, match="decoder='lstm' is not a registered mixer"):
        EncoderDecoder(5, 5, d_model=8, num_heads=2, decoder="lstm", rngs=nnx.Rngs(0))
    m = EncoderDecoder(5, 5, d_model=8, num_heads=2, enc_layers=1, dec_layers=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="src must have 2 dims"):
        m(jnp.zeros((2, 3, 1), jnp.int32), jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(TypeError, match="src must have a int dtype"):
        m(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="src_mask must have shape"):
        m(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4), bool))
    gappy = jnp.array([[True, True, False], [True, False, True]])  # row 1: a pad between real tokens
    with pytest.raises(ValueError, match=r"src_mask must be a prefix mask .* row 1 is \[1, 0, 1\]"):
        m(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3), jnp.int32), gappy)
    with pytest.raises(ValueError, match=r"src_mask must be a prefix mask .* row 0 is \[0, 1, 1\]"):  # left padding
        m.generate(jnp.zeros((2, 3), jnp.int32), 2, 1, jnp.array([[False, True, True], [True, True, False]]))
    prefix = jnp.array([[True, True, False], [True, False, False]])
    assert m(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3), jnp.int32), prefix).shape == (2, 3, 5)


def test_seq2seq_without_attention_reads_the_source_only_through_its_last_state():
    m = Seq2Seq(4, 6, hidden=8, d_emb=5, bidirectional=False, attention=False, rngs=nnx.Rngs(0))
    assert m.att is None and m.combine is None
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 4)), jnp.float32)
    tgt = jnp.array([[1, 2, 3], [1, 4, 5]], jnp.int32)
    logits = m(x, tgt)
    assert logits.shape == (2, 3, 6)
    # an attention mask has no effect without attention
    np.testing.assert_allclose(m(x, tgt, jnp.array([[True] * 5, [True, False, False, False, False]])), logits, atol=1e-6)
    toks, glog = m.generate(x, 4, 1)
    tin = jnp.concatenate([jnp.ones((2, 1), jnp.int32), toks[:, :-1]], 1)
    np.testing.assert_allclose(glog, m(x, tin), atol=1e-5)


# ----------------------------------------------------------------------------- experiment


def test_scan_experiment_two_steps(tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "scan.py")
    spec = importlib.util.spec_from_file_location("scan_experiment", path)
    exp = sys.modules["scan_experiment"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exp)
    rows = exp.main(["--preset=tiny", f"--out={tmp_path}"])
    out = tmp_path / "scan"
    assert [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()] == rows
    models = ("majority", "gru_att", "hybrid")
    assert {(r["model"], r["split"]) for r in rows} == {(m, s) for m in models for s in ("simple", "addprim_jump")}
    assert all(0.0 <= r["exact"] <= 1.0 and r["machine"] and r["date"] and r["paper"] for r in rows)
    assert all(r["steps"] == 2 and np.isfinite(r["train_loss"]) for r in rows if r["model"] != "majority")
    text = (out / "table.md").read_text()
    assert "| hybrid |" in text and "| addprim_jump |" in text and (out / "plot.png").exists()
