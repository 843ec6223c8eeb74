"""Task generators: exact format checks against their definitions, determinism, metrics on hand-made cases."""

import itertools

import numpy as np
import pytest

from seqjax.tasks import (
    IGNORE,
    classification,
    icll,
    masked_accuracy,
    mqar,
    passkey,
    recall,
    scaled_accuracy,
    sequence_accuracy,
    sets,
    state_tracking,
    timescales,
)


def _answer_positions(targets):
    return [np.flatnonzero(row != IGNORE) for row in targets]


def test_parity_format():
    b = state_tracking.parity(200, 3, 20, seed=1)
    assert b.inputs.shape == (200, 20) and b.vocab_size == 3 and b.num_classes == 2
    for x, y, pos in zip(b.inputs, b.targets, _answer_positions(b.targets)):
        assert len(pos) == 1
        n_bits = pos[0] + 1
        bits = x[:n_bits]
        assert set(np.unique(bits)) <= {1, 2} and np.all(x[n_bits:] == 0)
        assert y[pos[0]] == (np.sum(bits == 2) % 2) + 1
        assert 2 <= n_bits + 1 <= 20


def test_modular_arithmetic_matches_python_eval():
    b = state_tracking.modular_arithmetic(100, 3, 40, seed=2)
    inv = {1: "+", 2: "-", 3: "*"}
    for i, pos in enumerate(_answer_positions(b.targets)):
        (p,) = pos
        x = b.inputs[i]
        assert x[p] == 4 and (p % 2) == 1 and np.all(x[p + 1 :] == 0)  # '=' after an odd-length expression
        expr = "".join(str(t - 5) if t >= 5 else inv[t] for t in x[:p])
        assert (eval(expr) % 5) + 5 == b.targets[i, p]


def test_modular_arithmetic_brackets_matches_python_eval():
    b = state_tracking.modular_arithmetic_brackets(100, 4, 40, seed=3)
    sym = {5: "+", 6: "-", 7: "*", 8: "(", 9: ")"}
    for i, pos in enumerate(_answer_positions(b.targets)):
        (p,) = pos
        x = b.inputs[i]
        assert x[p] == 10 and np.all(x[p + 1 :] == 11)
        expr = "".join(str(t) if t < 5 else sym[t] for t in x[:p])
        assert expr.count("(") == expr.count(")")
        assert eval(expr) % 5 == b.targets[i, p]
        assert 1 <= p <= 37


def test_word_problem_running_product():
    elems, table = state_tracking.group_elements(3)
    assert len(elems) == 6 and sorted(table[0]) == list(range(6))  # a Latin square row
    b = state_tracking.word_problem(20, 2, 10, k=3, seed=4)
    for x, y in zip(b.inputs, b.targets):
        n = int(np.sum(y != IGNORE))
        p = np.arange(3)
        for t in range(n):
            g = np.array(elems[x[t]])
            p = g[p]  # g ∘ p
            assert elems[y[t]] == tuple(p)
        assert np.all(x[n:] == 6)


def test_mqar_format():
    b = mqar.mqar(50, 64, 4, vocab_size=256, seed=5)
    assert b.inputs.shape == (50, 64)
    for x, y in zip(b.inputs, b.targets):
        keys, vals = x[0:8:2], x[1:8:2]
        assert np.all((keys >= 1) & (keys < 128)) and np.all((vals >= 128) & (vals < 256))
        assert len(set(keys)) == 4
        pos = np.flatnonzero(y != IGNORE)
        assert len(pos) == 4 and np.all(pos >= 8) and np.all((pos - 8) % 2 == 0)
        for p in pos:
            k = x[p]
            assert y[p] == vals[list(keys).index(k)] and x[p + 1] == y[p]
    with pytest.raises(ValueError, match="seq_len"):
        mqar.mqar(1, 63, 4, vocab_size=256)


def test_mqar_gaps_favour_near_queries():
    b = mqar.mqar(400, 256, 16, vocab_size=512, seed=6)
    pos = np.concatenate(_answer_positions(b.targets)) - 32
    assert np.mean(pos < 112) > 0.5  # power law with a = 0.01: more mass on near gaps than uniform


def test_associative_recall_and_selective_copy():
    b = recall.associative_recall(30, 16, 32, seed=7)
    for x, y in zip(b.inputs, b.targets):
        keys, vals = list(x[0:14:2]), list(x[1:14:2])
        assert y[-2] == vals[keys.index(x[-2])]
    c = recall.selective_copying(30, 32, 5, 12, seed=8)
    for x, y in zip(c.inputs, c.targets):
        content = x[:32][x[:32] != 0]
        assert np.array_equal(content, y[32:]) and np.all(x[32:] == 1)


def test_h3_associative_recall_follows_its_definition():
    n = (20 - 1) // 2  # keys 1..9, values 10..18, 0 the query marker
    tr = recall.h3_associative_recall(40, 63, 20, seed=3)  # 63 -> 31 pairs
    ev = recall.h3_associative_recall(40, 63, 20, seed=3, train=False)
    assert tr.inputs.shape == tr.targets.shape == (40, 64) and np.array_equal(tr.inputs, ev.inputs)
    repeats = 0
    for x, y, ye in zip(tr.inputs, tr.targets, ev.targets):
        keys, vals = x[0:62:2], x[1:62:2]
        assert np.all((1 <= keys) & (keys <= n)) and np.all((n < vals) & (vals <= 2 * n))
        value_of = {}
        for k, v in zip(keys.tolist(), vals.tolist()):
            assert value_of.setdefault(k, v) == v  # one value per key in a sequence
        repeats += len(keys) - len(value_of)
        assert x[62] == 0 and x[63] in value_of  # the marker, then a key of the context
        assert np.array_equal(y[:-1], x[1:]) and y[-1] == value_of[x[63]]  # every next token a label
        assert np.all(ye[:-1] == IGNORE) and ye[-1] == y[-1]  # the test scores the query alone
    assert repeats > 40 * 20  # keys repeat: 31 pairs over 9 keys
    with pytest.raises(ValueError, match="vocab_size"):
        recall.h3_associative_recall(2, 16, 2)
    from seqjax.tasks import baselines

    assert masked_accuracy(baselines.ngram_lookup(ev.inputs, 2), ev.targets) == 1.0  # the bigram lookup solves it


def test_dfa_generator_properties():
    rng = np.random.default_rng(9)
    for _ in range(30):
        d = icll.random_dfa(rng)
        assert 1 <= d.num_states <= 12
        for edges in d.delta:
            assert 1 <= len(edges) <= 3  # (merging equivalent states may create self-loops)
        # minimal: no two states have identical transition signatures
        sigs = [tuple(sorted(e.items())) for e in d.delta]
        assert len(set(sigs)) == len(sigs)
        # trimmed: all states reachable from 0
        seen, stack = {0}, [0]
        while stack:
            for n in d.delta[stack.pop()].values():
                if n not in seen:
                    seen.add(n)
                    stack.append(n)
        assert seen == set(range(d.num_states))


def test_icll_strings_accepted_and_metric():
    b = icll.icll(10, 300, seed=10)
    for x, dfa in zip(b.inputs, b.meta):
        toks = [t for t in x if t != icll.PAD]
        strings = [list(g) for k, g in itertools.groupby(toks, lambda t: t == icll.SEP) if not k]
        assert 10 <= len(strings) <= 19 or len(toks) == 300  # unless truncated
        assert all(dfa.accepts(s) for s in strings)
    # the true next token is always accepted; a surely-invalid letter never is
    acc = icll.dfa_accuracy(np.where(b.targets == IGNORE, icll.SEP, b.targets), b.inputs, b.meta)
    assert acc == 1.0


def test_minimize_merges_equivalent_states():
    # states 1 and 2 are equivalent (both go to 3 on letter 0, nothing else)
    delta = [{0: 1, 1: 2}, {0: 3}, {0: 3}, {2: 0}]
    m = icll.minimize(delta, [0, 1, 2])
    assert len(m) == 3 and m[0][0] == m[0][1]


def test_timescale_targets():
    b = timescales.stream(20, 50, 3, task="parity", seed=11)
    x, y = b.inputs, b.targets
    for t in range(2, 50):
        assert np.array_equal(y[:, t], x[:, t - 2 : t + 1].sum(1) % 2)
    assert np.all(y[:, :2] == IGNORE)
    d = timescales.stream(20, 50, 4, task="dms", seed=11)
    assert np.array_equal(d.targets[:, 4:], (d.inputs[:, 4:] == d.inputs[:, :-4]).astype(np.int32))
    multi = timescales.multi_targets(x, 3)
    assert multi.shape == (20, 50, 3) and np.array_equal(multi[..., 2], y)


def test_passkey_format():
    b = passkey.passkey(10, 128, depth=0.5, seed=12)
    for x, y in zip(b.inputs, b.targets):
        p = int(np.flatnonzero(x == passkey.PASS)[0])
        key = x[p + 1 : p + 6]
        q = int(np.flatnonzero(x == passkey.QUERY)[0])
        assert np.array_equal(x[q + 1 : q + 6], key) and np.array_equal(y[q : q + 5], key)
        assert np.sum(y != IGNORE) == 5 and np.all(key < 10)
    early = passkey.passkey(1, 512, depth=0.0, seed=0).inputs[0]
    late = passkey.passkey(1, 512, depth=1.0, seed=0).inputs[0]
    assert np.flatnonzero(early == passkey.PASS)[0] < np.flatnonzero(late == passkey.PASS)[0]


@pytest.mark.parametrize("short_first", [True, False])
def test_disjoint_sets_have_one_overlap(short_first):
    b = sets.disjoint_sets(30, 4, 16, 128, short_first=short_first, seed=13)
    for x, y in zip(b.inputs, b.targets):
        sep = int(np.flatnonzero(x == 2)[0])
        a, c = set(x[1:sep]), set(x[sep + 1 : -1])
        assert len(a & c) == 1 and y[-1] == next(iter(a & c))
        assert (len(a) == 4) == short_first


def test_generators_deterministic():
    for f in [lambda s: state_tracking.parity(5, 3, 9, seed=s), lambda s: mqar.mqar(5, 64, 4, 256, seed=s),
              lambda s: icll.icll(3, 100, seed=s)]:
        assert np.array_equal(f(3).inputs, f(3).inputs) and not np.array_equal(f(3).inputs, f(4).inputs)


def test_classification_data():
    x, y, xt, yt = classification.digits()
    assert x.shape[1:] == (64, 1) and len(x) + len(xt) == 1797 and 0 <= x.min() and x.max() <= 1
    xp, _, _, _ = classification.digits(permuted=True)
    assert np.allclose(np.sort(xp[0, :, 0]), np.sort(x[0, :, 0]))


def test_metrics_on_hand_made_cases():
    t = np.array([[IGNORE, 1, IGNORE, 2], [3, IGNORE, IGNORE, IGNORE]])
    p = np.array([[0, 1, 5, 0], [3, 9, 9, 9]])
    assert masked_accuracy(p, t) == pytest.approx(2 / 3)
    assert sequence_accuracy(p, t) == pytest.approx(0.5)
    assert scaled_accuracy(0.5, 2) == 0.0 and scaled_accuracy(1.0, 5) == 1.0
    with pytest.raises(ValueError, match="num_classes"):
        scaled_accuracy(0.5, 1)
