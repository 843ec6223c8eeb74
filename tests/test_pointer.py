"""Pointer networks and their planar tasks: generators against independent definitions (hull by a monotone
chain, Held–Karp against brute force), metrics on hand-made cases, the pointer's validity masks, greedy =
beam width 1 = teacher forcing on its own output, padding, clear errors; the experiment for two steps."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from seqjax.models import pointer as P
from seqjax.tasks import IGNORE
from seqjax.tasks import geometry as G

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


def _monotone_chain(pts):
    """Andrew's monotone chain: the hull's vertex indices counter-clockwise (no collinear points)."""
    order = sorted(range(len(pts)), key=lambda i: (pts[i][0], pts[i][1]))
    cross = lambda o, a, b: (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
    lower, upper = [], []
    for seq, out in ((order, lower), (order[::-1], upper)):
        for i in seq:
            while len(out) >= 2 and cross(pts[out[-2]], pts[out[-1]], pts[i]) <= 0:
                out.pop()
            out.append(i)
    return lower[:-1] + upper[:-1]


def test_hull_labels_are_counter_clockwise_complete_and_closed():
    b = G.convex_hull(60, (3, 25), seed=1)
    assert b.points.shape == (60, 25, 2) and b.targets.shape == (60, 26)
    for i in range(60):
        n = int(b.mask[i].sum())
        assert np.all(b.points[i, n:] == 0) and not b.mask[i, n:].any()
        seq = G.decoded_sequence(b.targets[i])
        body = seq[:-1]
        assert seq[-1] == seq[0] == min(body) and len(set(body)) == len(body)  # from the lowest index, closed
        ref = _monotone_chain(b.points[i, :n].tolist())
        k = ref.index(min(ref))
        assert body == ref[k:] + ref[:k]  # the same vertices in the same (counter-clockwise) order
        assert G.polygon_area(b.points[i], body) > 0 and np.isclose(G.polygon_area(b.points[i], body), b.extras["area"][i])


def test_generators_are_deterministic_by_seed():
    a, b = G.convex_hull(8, (5, 9), seed=3), G.convex_hull(8, (5, 9), seed=3)
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.targets, b.targets)
    assert not np.array_equal(a.points, G.convex_hull(8, (5, 9), seed=4).points)
    np.testing.assert_array_equal(G.tsp(4, 6, seed=2).targets, G.tsp(4, 6, seed=2).targets)


@pytest.mark.parametrize("n", [4, 5, 6, 7])
def test_held_karp_is_optimal_against_brute_force(n):
    pts = np.random.default_rng(n).random((6, n, 2))
    tours, lengths = G.held_karp(pts)
    for i in range(6):
        best_tour, best = G.brute_force_tour(pts[i])
        assert list(tours[i]) == best_tour and np.isclose(lengths[i], best)
        assert np.isclose(G.tour_length(pts[i], tours[i]), lengths[i])


def test_brute_force_tour_by_hand():
    square = np.array([[0, 0], [1, 1], [1, 0], [0, 1]], float)  # the tour 0-2-1-3 goes round the square
    tour, length = G.brute_force_tour(square)
    assert tour == [0, 2, 1, 3] and np.isclose(length, 4.0)


def test_tsp_labels_are_canonical_tours():
    b = G.tsp(20, (5, 8), seed=5)
    for i in range(20):
        n = int(b.mask[i].sum())
        t = G.decoded_sequence(b.targets[i])
        assert sorted(t) == list(range(n)) and t[0] == 0 and t[1] < t[-1]
        assert np.isclose(G.tour_length(b.points[i], t), b.extras["length"][i])


def test_two_opt_is_between_optimal_and_nearest_neighbour():
    pts = np.random.default_rng(0).random((5, 9, 2))
    _, opt = G.held_karp(pts)
    for i in range(5):
        t = G.two_opt(pts[i])
        assert sorted(t) == list(range(9))
        length = G.tour_length(pts[i], t)
        assert opt[i] - 1e-9 <= length <= G.tour_length(pts[i], G.nearest_neighbour_tour(pts[i])) + 1e-9


def test_hull_scores_by_hand():
    pts = np.zeros((1, 5, 2), np.float32)
    pts[0] = [[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.4]]  # a unit square and one point inside
    b = G.PointerBatch(pts, np.ones((1, 5), bool), np.array([[0, 1, 2, 3, 0, IGNORE]]), {"area": np.array([1.0])})
    pad = lambda s: np.array([s + [IGNORE] * (6 - len(s))])
    assert G.hull_scores(b, pad([0, 1, 2, 3, 0])) == {"exact": 1.0, "area_coverage": 1.0, "valid": 1.0}
    assert G.hull_scores(b, pad([0, 1, 2, 0])) == {"exact": 0.0, "area_coverage": 0.5, "valid": 1.0}
    assert G.hull_scores(b, pad([0, 2, 1, 3, 0]))["valid"] == 0.0  # crosses itself
    assert G.hull_scores(b, pad([0, 1, 2, 3]))["valid"] == 0.0  # not closed
    assert G.hull_scores(b, pad([0, 1, 1, 2, 0]))["valid"] == 0.0  # a repeated point
    s = G.hull_scores(b, pad([0, 1, 2, 4, 3, 0]))  # through the inside point: valid, less area
    assert s["valid"] == 1.0 and np.isclose(s["area_coverage"], 1.0 - 0.5 * 0.6)


def test_tour_lengths_and_delaunay_scores_by_hand():
    pts = np.array([[[0, 0], [1, 0], [1, 1], [0, 1]]], np.float32)
    b = G.PointerBatch(pts, np.ones((1, 4), bool), np.array([[0, 1, 2, 3]]), {"length": np.array([4.0])})
    lengths, valid = G.tour_lengths(b, np.array([[0, 2, 1, 3], [0, 1, 1, 3]])[:1])
    assert valid.all() and np.isclose(lengths[0], 2 + 2 * np.sqrt(2))
    assert not G.tour_lengths(b, np.array([[0, 1, 1, 3]]))[1].any()
    d = G.delaunay(3, 6, seed=0)
    assert G.delaunay_scores(d, d.targets) == {"exact": 1.0, "triangle_coverage": 1.0}
    assert all(G.decoded_sequence(t)[-1] == 6 for t in d.targets)  # the end pointer, past the points
    first = d.targets.copy()
    first[:, 3:] = IGNORE  # only the first triangle
    s = G.delaunay_scores(d, first)
    assert s["exact"] == 0.0 and np.isclose(s["triangle_coverage"], np.mean([1 / len(t) for t in d.extras["triangles"]]))


def test_generators_name_bad_input():
    with pytest.raises(ValueError, match="pts must have shape \\[n, 2\\]"):
        G.hull_sequence(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="n must be"):
        G.convex_hull(2, 2)
    with pytest.raises(ValueError, match="n must be"):
        G.tsp(2, (8, 5))
    with pytest.raises(ValueError, match="held_karp needs"):
        G.held_karp(np.zeros((1, 14, 2)))
    with pytest.raises(ValueError, match="pts must have shape \\[batch, n, 2\\]"):
        G.held_karp(np.zeros((14, 2)))


# ----------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def net():
    return P.PointerNet(2, 16, rngs=nnx.Rngs(0))


def _padded(num=5, n=(4, 9), seed=0):
    b = G.convex_hull(num, n, seed=seed)
    return jnp.asarray(b.points), jnp.asarray(b.mask), b


@pytest.mark.parametrize("mode", P.MODES)
def test_decoded_pointers_are_valid(net, mode):
    x, mask, b = _padded()
    end = x.shape[1]
    for beam in (1, 3):
        toks, _ = net.decode(x, mask, mode=mode, beam=beam)
        assert toks.shape == (len(b), P.default_max_len(mode, end))
        for i in range(len(b)):
            seq, n = G.decoded_sequence(np.asarray(toks[i])), int(b.mask[i].sum())
            if mode == "tour":
                assert sorted(seq) == list(range(n))  # every point once, never padding
            elif mode == "free":
                assert len(seq) == n and all(0 <= j < n for j in seq)  # n pointers, never padding (repeats allowed)
            elif mode == "cycle":
                assert seq[-1] == seq[0] and len(seq) >= 4 and len(set(seq[:-1])) == len(seq) - 1  # closes, no repeat
                assert all(0 <= j < n for j in seq)
            elif seq[-1] == end:  # triangles: ascending triples of real points, the end between triples
                tri = np.array(seq[:-1]).reshape(-1, 3)
                assert len(tri) >= 1 and np.all(np.diff(tri, axis=1) > 0) and tri.max() < n
            else:  # ran out of steps before the end: still ascending triples
                assert len(seq) == toks.shape[1] and all(j < n for j in seq)


def test_teacher_forced_masks(net):
    x, mask, b = _padded()
    y = jnp.asarray(b.targets)
    logits = np.asarray(net(x, y, mask, mode="cycle"))
    for i in range(len(b)):
        n = int(b.mask[i].sum())
        seq = G.decoded_sequence(b.targets[i])
        for t in range(len(seq)):
            masked = logits[i, t] <= -1e8
            assert masked[n:].all()  # padding
            assert all(masked[j] for j in seq[1:t])  # already chosen (the first only until it may close)
            assert masked[seq[0]] == (0 < t < 3)
            assert not masked[seq[t]]  # the label is always allowed


@pytest.mark.parametrize("mode", P.MODES)
def test_beam_width_one_is_greedy(net, mode):
    x, mask, _ = _padded()
    params = net.param_dict()
    g_toks, g_lp = P.greedy_decode("lstm", params, x, mask, mode=mode)
    b_toks, b_lp = P.beam_search("lstm", params, x, mask, mode=mode, width=1)
    np.testing.assert_array_equal(g_toks, b_toks)
    np.testing.assert_allclose(g_lp, b_lp, rtol=1e-6)


@pytest.mark.parametrize("mode", P.MODES)
@pytest.mark.parametrize("beam", [1, 3])
def test_teacher_forcing_reproduces_the_decoded_log_probability(net, mode, beam):
    """The two computation modes agree: feeding the decoded pointers (greedy or the best beam) back with teacher
    forcing gives the log-probability the decoder reported."""
    x, mask, _ = _padded()
    toks, lp = net.decode(x, mask, mode=mode, beam=beam)
    logp = jax.nn.log_softmax(net(x, toks, mask, mode=mode), -1)
    keep = toks != IGNORE
    got = jnp.sum(jnp.where(keep, jnp.take_along_axis(logp, jnp.where(keep, toks, 0)[..., None], -1)[..., 0], 0.0), 1)
    np.testing.assert_allclose(got, lp, rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_the_decoding(net):
    x, _, b = _padded(num=1, n=6)
    junk = jnp.concatenate([x, jnp.full((1, 4, 2), 0.7)], 1)
    mask = jnp.arange(10)[None] < 6
    for mode in P.MODES:
        steps = P.default_max_len(mode, 6)
        t0, lp0 = net.decode(x, mode=mode, beam=2, max_len=steps)
        t1, lp1 = net.decode(junk, mask, mode=mode, beam=2, max_len=steps)
        padded = [6 if j == 10 else j for j in G.decoded_sequence(np.asarray(t1[0]))]  # the end slot moves with n
        assert G.decoded_sequence(np.asarray(t0[0])) == padded
        np.testing.assert_allclose(lp0, lp1, rtol=1e-5)


def test_pointer_net_trains_on_a_fixed_batch():
    b = G.convex_hull(16, 6, seed=0)
    net = P.PointerNet(2, 32, rngs=nnx.Rngs(1))
    opt = nnx.Optimizer(net, optax.adam(1e-2), wrt=nnx.Param)
    args = tuple(jnp.asarray(a) for a in (b.points, b.targets, b.mask))

    @nnx.jit
    def step(m, opt, x, y, mask):
        loss, g = nnx.value_and_grad(lambda m: P.sequence_nll(m(x, y, mask, mode="cycle"), y))(m)
        opt.update(m, g)
        return loss

    losses = [float(step(net, opt, *args)) for _ in range(60)]
    assert losses[-1] < 0.5 * losses[0]


def test_pointer_names_bad_input(net):
    x, mask, b = _padded()
    with pytest.raises(ValueError, match="x must have shape"):
        net.decode(jnp.zeros((2, 5, 3)), mode="tour")
    with pytest.raises(ValueError, match="mask must have shape"):
        net.decode(x, mask[:, :3], mode="tour")
    with pytest.raises(TypeError, match="mask must have a bool dtype"):
        net.decode(x, mask.astype(jnp.int32), mode="tour")
    with pytest.raises(ValueError, match="mode='path' is not one of"):
        net.decode(x, mask, mode="path")
    with pytest.raises(ValueError, match="targets must have 2 dims"):
        net(x, jnp.asarray(b.targets)[0], mask, mode="cycle")
    with pytest.raises(ValueError, match="width must be >= 1"):
        P.beam_search("lstm", net.param_dict(), x, mask, width=0)
    with pytest.raises(ValueError, match="needs at least 3 points"):
        net.decode(x[:, :2], mode="cycle")


# ----------------------------------------------------------------------------- the experiment


@pytest.mark.parametrize("task", ["hull", "tsp", "delaunay"])
def test_pointer_experiment_two_steps(task, tmp_path):
    import pointer

    rows = pointer.main([f"--task={task}", "--preset=tiny", f"--out={tmp_path}"])
    out = tmp_path / f"pointer_{task}"
    lines = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert lines == rows and (out / "plot.png").exists()
    tests = [r for r in rows if r["kind"] == "test"]
    assert {r["model"] for r in tests} >= ({"ptr"} if task == "delaunay" else {"ptr", "s2s_att", "s2s"})
    assert all(r["machine"] and r["date"] and r["seed"] == 0 and "paper" in r for r in tests)
    assert {r["decode"] for r in tests if r["model"] == "ptr"} == {"greedy", "beam2"}
    if task != "delaunay":
        assert all(r["valid"] == 1.0 for r in tests if r["model"] == "ptr")  # the masks make every decoding valid
    table = (out / "table.md").read_text()
    assert "| ptr | greedy | 6 |" in table and "python experiments/pointer.py" in table
    if task == "hull":  # a second run writes its records afresh, never appended
        pointer.main([f"--task={task}", "--preset=tiny", f"--out={tmp_path}", "--models=ptr"])
        assert len((out / "records.jsonl").read_text().splitlines()) == len([r for r in lines if r["model"] == "ptr"])
