import numpy as np
import pytest
from sklearn.datasets import load_digits

from seqjax.tasks.moving_digits import DIRECTIONS_4, DIRECTIONS_8, TEST_FROM, _reflect, decode_caption, moving_digits

N, T = 64, 9


@pytest.fixture(scope="module")
def clips():
    return moving_digits(N, T, turn=True, seed=3)


def _com(frames):
    """Centre of mass (row, col) of each frame ``[..., H, W, 1]``."""
    img = frames[..., 0]
    rows, cols = np.arange(img.shape[-2]), np.arange(img.shape[-1])
    m = img.sum((-1, -2))
    return np.stack([(img.sum(-1) * rows).sum(-1) / m, (img.sum(-2) * cols).sum(-1) / m], -1)


def test_shapes_dtypes_and_determinism(clips):
    d = clips
    assert d["frames"].shape == (N, T, 32, 32, 1) and d["frames"].dtype == np.float32
    assert 0.0 <= d["frames"].min() and d["frames"].max() == 1.0
    assert d["caption"].shape == (N, 7) and d["caption"].dtype == np.int32
    assert d["positions"].shape == (N, 1, T, 2) and d["turn_at"] == T // 2
    for key in ("digit", "direction", "direction2", "speed"):
        assert d[key].shape == (N,) and d[key].dtype == np.int32
    again = moving_digits(N, T, turn=True, seed=3)
    other = moving_digits(N, T, turn=True, seed=4)
    assert all(np.array_equal(d[k], again[k]) for k in ("frames", "caption", "positions"))
    assert not np.array_equal(d["frames"], other["frames"])


def test_motion_matches_labels(clips):
    d = clips
    names, speeds, hi = d["direction_names"], d["speeds"], 32 - 16
    com = _com(d["frames"])  # [N, T, 2]
    # the centre of mass moves exactly as the digit's corner: the sprite is fully inside every frame
    np.testing.assert_allclose(np.diff(com, axis=1), np.diff(d["positions"][:, 0], axis=1), atol=1e-4)
    step0 = com[:, 1] - com[:, 0]
    vec = np.array([DIRECTIONS_8[names[k]] for k in d["direction"]]) * np.asarray(speeds)[d["speed"]][:, None]
    np.testing.assert_allclose(step0, vec, atol=1e-4)
    # replay the definition: reflect at the walls, turn to direction2 at turn_at
    vec2 = np.array([DIRECTIONS_8[names[k]] for k in d["direction2"]]) * np.asarray(speeds)[d["speed"]][:, None]
    p, v, bounces = d["positions"][:, 0, 0].astype(np.int64), vec.copy(), 0
    for t in range(T - 1):
        if t == d["turn_at"]:
            v = vec2.copy()
            np.testing.assert_allclose(com[:, t + 1] - com[:, t], vec2, atol=1e-4)  # the turn's first step is free
        q = p + v
        out = (q < 0) | (q > hi)
        bounces += out.sum()
        q = np.where(q < 0, -q, np.where(q > hi, 2 * hi - q, q))
        v = np.where(out, -v, v)
        p = q
        np.testing.assert_array_equal(p, d["positions"][:, 0, t + 1])
    assert bounces > 0  # the batch exercises the walls
    assert np.all(d["direction2"] != d["direction"])


def test_reflect_hand_cases():
    q, v = _reflect(np.array([14, 1, 5, 16]), np.array([3, -3, 2, 0]), 16)
    np.testing.assert_array_equal(q, [15, 2, 7, 16])
    np.testing.assert_array_equal(v, [-3, 3, 2, 0])


def test_captions_decode_to_labels(clips):
    d = clips
    names = d["direction_names"]
    for i in range(N):
        want = f"digit {d['digit'][i]} moves {names[d['direction'][i]]} then {names[d['direction2'][i]]}"
        assert decode_caption(d["caption"][i], d["caption_vocab"]) == want
    assert d["caption_vocab"][d["caption"][0, -1]] == "<eos>"
    plain = moving_digits(4, 3, n_directions=4, seed=0)
    assert plain["caption"].shape == (4, 5) and np.all(plain["direction2"] == -1) and plain["turn_at"] == 3
    assert set(plain["direction_names"]) == set(DIRECTIONS_4)
    assert decode_caption(plain["caption"][0], plain["caption_vocab"]) == (
        f"digit {plain['digit'][0]} moves {plain['direction_names'][plain['direction'][0]]}")


def test_splits_use_disjoint_images_and_frames_hold_them():
    train = moving_digits(40, 3, n_digits=2, seed=0)
    test = moving_digits(40, 3, n_digits=2, seed=0, split="test")
    assert train["source"].max() < TEST_FROM <= test["source"].min()
    data = load_digits()
    np.testing.assert_array_equal(test["digits"], data.target[test["source"]])
    # two digits combine by max of the upsampled sprites at their corners
    i = 0
    want = np.zeros((32, 32), np.float32)
    for j in range(2):
        r, c = test["positions"][i, j, 2]
        sprite = np.kron(data.images[test["source"][i, j]] / 16.0, np.ones((2, 2)))
        want[r:r + 16, c:c + 16] = np.maximum(want[r:r + 16, c:c + 16], sprite)
    np.testing.assert_allclose(test["frames"][i, 2, ..., 0], want, atol=1e-6)


def test_sizes():
    d = moving_digits(2, 4, size=64, digit_size=24, n_digits=2, seed=1)
    assert d["frames"].shape == (2, 4, 64, 64, 1)
    assert d["positions"].min() >= 0 and d["positions"].max() <= 64 - 24


@pytest.mark.parametrize("kwargs, name", [
    (dict(n_frames=0), "n_frames"), (dict(n_frames=2, turn=True), "n_frames"), (dict(size=16), "size"),
    (dict(split="val"), "split"), (dict(digit_size=12), "digit_size"), (dict(n_digits=3), "n_digits"),
    (dict(n_directions=6), "n_directions"), (dict(n_clips=0), "n_clips"), (dict(speeds=(0, 1)), "speeds"),
])
def test_bad_input(kwargs, name):
    args = dict(n_clips=2, n_frames=4) | kwargs
    with pytest.raises(ValueError, match=name):
        moving_digits(args.pop("n_clips"), args.pop("n_frames"), **args)
