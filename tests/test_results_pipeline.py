"""The results pipeline: the ICLL metric (the paper's rule), the trivial baselines, and the sweep's tables."""

import numpy as np
import pytest

from seqjax.tasks import IGNORE, icll, masked_accuracy, mqar, recall, scaled_accuracy, state_tracking
from seqjax.tasks import baselines as B

# ----------------------------------------------------------------------------- ICLL metric

# state 0 --a--> 1; state 1 --b--> 0, --c--> 0.   a=0, b=1, c=2
_DFA = icll.DFA(({0: 1}, {1: 0, 2: 0}))
#                  t: 0  1  2        3  4  5  6        7
_SEQ = np.array([[0, 1, icll.SEP, 0, 2, 0, icll.PAD, icll.PAD]])
# scored: t=0 (after "a", next b; valid b, c), t=2 (after "|", next a; valid a), t=3 ("a", valid b, c),
# t=4 ("a c", valid a); t=1 (next is "|") and t>=5 (next is pad) are not scored.


def _score(pred):
    return icll.dfa_accuracy(np.array([pred]), _SEQ, [_DFA])


def test_dfa_accuracy_follows_the_papers_rule_on_a_hand_made_sequence():
    sep = icll.SEP
    assert _score([1, 9, 0, 2, 0, 9, 9, 9]) == 1.0  # every scored prediction valid; t=1, 5.. free
    assert _score([2, sep, 0, 1, 1, 0, 0, 0]) == 0.75  # t=4: "a c" then "b" is rejected
    assert _score([sep] * 8) == 0.0  # "|" is never a transition: the always-separator predictor scores 0
    assert _score([1, 1, 1, 1, 1, 1, 1, 1]) == 0.5  # t=2 and t=4 need "a"
    assert _score([icll.PAD] * 8) == 0.0


def test_icll_targets_mask_the_separator_and_a_perfect_predictor_scores_one():
    b = icll.icll(6, 160, seed=3)
    assert not np.any(b.targets == icll.SEP) and np.any(b.inputs == icll.SEP)
    nxt = np.full_like(b.inputs, IGNORE)
    nxt[:, :-1] = b.inputs[:, 1:]
    assert np.array_equal(b.targets, np.where((nxt == icll.SEP) | (nxt == icll.PAD), IGNORE, nxt))
    assert icll.dfa_accuracy(np.where(b.targets == IGNORE, 0, b.targets), b.inputs, b.meta) == 1.0
    assert icll.dfa_accuracy(icll.always_separator(b.inputs), b.inputs, b.meta) == 0.0


def test_dfa_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="predictions"):
        icll.dfa_accuracy(np.zeros((1, 7), np.int32), _SEQ, [_DFA])
    with pytest.raises(ValueError, match="dfas"):
        icll.dfa_accuracy(_SEQ, _SEQ, [])


# ----------------------------------------------------------------------------- baselines


def test_ngram_lookup_hand_made():
    seq = np.array([[5, 7, 5, 8, 5, 8, 5]])
    # t=2: 5 was followed by 7; t=4: 7 and 8 once each, the latest (8) wins; t=5: 8 -> 5; t=6: 8 twice
    assert B.ngram_lookup(seq).tolist() == [[-1, -1, 7, -1, 8, 5, 8]]
    # trigram: context (5, 8) seen once, followed by 5
    assert B.ngram_lookup(seq, 3).tolist() == [[-1, -1, -1, -1, -1, 5, 8]]
    assert B.ngram_lookup(seq, ignore=(7,)).tolist() == [[-1, -1, -1, -1, 8, 5, 8]]
    with pytest.raises(ValueError, match="n must be"):
        B.ngram_lookup(seq, 1)
    with pytest.raises(ValueError, match="inputs"):
        B.ngram_lookup(seq.astype(np.float32))


def test_icll_bigram_never_predicts_the_separator():
    assert B.copy_last(_SEQ).tolist() == _SEQ.tolist()
    # t=3: "a" was followed by "b" earlier; "|" and pad have no letter follower yet
    assert icll.bigram_lookup(_SEQ).tolist() == [[-1, -1, -1, 1, -1, 2, -1, -1]]  # t=5: b, c tie; c is later
    assert _score(icll.bigram_lookup(_SEQ)[0]) == 0.25


def test_bigram_lookup_solves_recall_without_training():
    b = mqar.mqar(16, 64, 4, 256, seed=1)
    assert masked_accuracy(B.ngram_lookup(b.inputs), b.targets) == 1.0
    b = recall.associative_recall(16, 32, 32, seed=1)
    assert masked_accuracy(B.ngram_lookup(b.inputs), b.targets) == 1.0
    assert masked_accuracy(B.copy_last(b.inputs), b.targets) == 0.0  # keys and values never coincide


def test_chance_and_majority_closed_forms():
    b = state_tracking.parity(64, 3, 10, seed=0)

    def metric(p, bb):
        acc = masked_accuracy(p, bb.targets)
        return {"acc": acc, "scaled_acc": scaled_accuracy(acc, 2)}

    out = B.trivial_baselines(metric, b, b.targets)
    assert out["chance"]["acc"] == pytest.approx(0.5) and out["chance"]["scaled_acc"] == pytest.approx(0.0)
    labels = b.targets[b.targets != IGNORE]
    frac2 = np.mean(labels == 2)
    assert out["majority"]["acc"] == pytest.approx(max(frac2, 1 - frac2))
    assert B.majority([[IGNORE, 3, 3], [4, 4, IGNORE]]) == 3 and B.answer_tokens([[IGNORE, 4, 3]]).tolist() == [3, 4]
    # ICLL chance on the hand-made sequence: (2/3 + 1/3 + 2/3 + 1/3) / 4 over the answer letters a, b, c
    got = B.chance(lambda p, bb: {"a": icll.dfa_accuracy(p, bb.inputs, bb.meta)},
                   icll.TaskBatch(_SEQ, _SEQ, meta=[_DFA]), [0, 1, 2])
    assert got["a"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no scored"):
        B.majority([[IGNORE]])
