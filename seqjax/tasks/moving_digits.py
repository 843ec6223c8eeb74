"""Moving digits: scikit-learn's 8×8 digits bouncing in a frame, with digit, motion and caption labels.

A stand-in for Moving MNIST (Srivastava et al. 2015) that needs no download, for video prediction (ConvS5,
ConvLSTM) and video classification / description (LRCN). Each source image (1,797 of them, 0–16 ink) is scaled
to [0, 1] and upsampled by pixel repetition to ``digit_size`` (a multiple of 8). A digit's top-left corner moves
on the integer grid ``[0, size − digit_size]²`` with velocity ``speed · (d_row, d_col)``, ``d ∈ {−1, 0, 1}²``
one of the compass ``directions`` (rows grow downwards: "up" is ``d_row = −1``); at a wall it reflects
(``p → −p`` below 0, ``p → 2L − p`` above ``L``) and that velocity component changes sign. Overlapping digits
combine by ``max``.

Labels concern the first digit (a second one, ``n_digits=2``, is a distractor with its own constant velocity):

- ``digit``: its class; ``speed``: the class of its speed in ``speeds`` (pixels per frame along each moving axis);
- ``direction``: the direction of its first step (the start is drawn so that the first step does not touch a wall);
- ``turn=True``: from frame ``turn_at = n_frames // 2`` on, it moves in ``direction2`` (different from
  ``direction`` and from its current, possibly reflected, direction; chosen so that the first new step does not
  touch a wall), and the caption reads "digit 3 moves left then up"; ``turn=False``: "digit 3 moves left".

Train and test clips draw from disjoint source images (sklearn indices below / from ``TEST_FROM``).
:func:`tfds_moving_mnist` loads the real Moving MNIST through TFDS (``moving_mnist``: 10,000 unlabelled clips of
20 frames, 64×64, test split only) on machines that can download.
"""

from __future__ import annotations

import numpy as np

from seqjax.tasks.classification import digit_images

__all__ = [
    "DIRECTIONS_8", "DIRECTIONS_4", "SPLITS", "TEST_FROM", "moving_digits", "caption_vocab", "decode_caption",
    "tfds_moving_mnist",
]

#: name → (d_row, d_col); rows grow downwards
DIRECTIONS_8 = {
    "right": (0, 1), "up-right": (-1, 1), "up": (-1, 0), "up-left": (-1, -1),
    "left": (0, -1), "down-left": (1, -1), "down": (1, 0), "down-right": (1, 1),
}
DIRECTIONS_4 = {k: DIRECTIONS_8[k] for k in ("right", "up", "left", "down")}
SPLITS = ("train", "test")
TEST_FROM = 1438  # sklearn digit images [0, 1438) are train sources, [1438, 1797) test sources (80/20)
SPECIALS = ("<pad>", "<bos>", "<eos>")


def caption_vocab(n_directions: int = 8) -> list[str]:
    """The caption tokens: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, then the words, digits and directions."""
    names = DIRECTIONS_8 if n_directions == 8 else DIRECTIONS_4
    return [*SPECIALS, "digit", "moves", "then", *(str(d) for d in range(10)), *names]


def decode_caption(ids, vocab) -> str:
    """The words of one caption row, up to ``<eos>``, padding dropped."""
    words = []
    for i in np.asarray(ids).tolist():
        if vocab[i] == "<eos>":
            break
        if vocab[i] not in SPECIALS:
            words.append(vocab[i])
    return " ".join(words)


def _reflect(p, v, hi):
    """One step of ``p + v`` reflected into ``[0, hi]`` (``|v| <= hi``); returns the new position and velocity."""
    q = p + v
    low, high = q < 0, q > hi
    q = np.where(low, -q, np.where(high, 2 * hi - q, q))
    return q, np.where(low | high, -v, v)


def _start(rng, v, hi):
    """Start positions (one axis) uniform over those whose first step ``p + v`` stays inside ``[0, hi]``."""
    lo_, hi_ = np.maximum(0, -v), hi - np.maximum(0, v)
    return lo_ + np.floor(rng.random(v.shape) * (hi_ - lo_ + 1)).astype(np.int64)


def moving_digits(n_clips: int, n_frames: int, *, size: int = 32, n_digits: int = 1, digit_size: int = 16,
                  split: str = "train", turn: bool = False, n_directions: int = 8, speeds=(1, 2, 3),
                  seed: int = 0) -> dict:
    """``n_clips`` clips of ``n_frames`` frames (see the module docstring). Returns a dict of numpy arrays:

    - ``frames`` ``[N, T, size, size, 1]`` float32 in [0, 1];
    - ``digit``, ``direction``, ``speed`` ``[N]`` int32; ``direction2`` ``[N]`` int32 (``-1`` when ``turn=False``);
    - ``positions`` ``[N, n_digits, T, 2]`` int32 top-left corners (row, col); ``source`` ``[N, n_digits]`` int32
      sklearn image indices; ``digits`` ``[N, n_digits]`` int32 all digits' classes;
    - ``caption`` ``[N, L]`` int32 ids into ``caption_vocab`` (``L`` = 7 with a turn, 5 without; ends in ``<eos>``);

    and ``caption_vocab`` (list of str), ``direction_names`` (list of str), ``speeds`` (tuple), ``turn_at`` (int:
    the first frame transition ``t → t+1`` that uses the new direction; ``n_frames`` when ``turn=False``).
    """
    speeds = tuple(int(s) for s in speeds)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    if n_directions not in (4, 8):
        raise ValueError(f"n_directions must be 4 or 8, got {n_directions}")
    if not speeds or min(speeds) < 1:
        raise ValueError(f"speeds must be a non-empty tuple of positive ints (pixels per frame), got {speeds}")
    if n_clips < 1:
        raise ValueError(f"n_clips must be >= 1, got {n_clips}")
    least = 3 if turn else 2
    if n_frames < least:
        raise ValueError(f"n_frames must be >= {least} (two frames show a motion{', three a turn' if turn else ''}), got {n_frames}")
    if digit_size < 8 or digit_size % 8:
        raise ValueError(f"digit_size must be a positive multiple of 8 (the sklearn digits are 8x8), got {digit_size}")
    if size < digit_size + 2 * max(speeds):
        raise ValueError(f"size must be >= digit_size + 2 * max(speeds) = {digit_size + 2 * max(speeds)} so a digit can move "
                         f"and turn inside the frame, got size={size}")
    if n_digits not in (1, 2):
        raise ValueError(f"n_digits must be 1 or 2, got {n_digits}")

    images, targets = digit_images()
    pool = np.arange(TEST_FROM) if split == "train" else np.arange(TEST_FROM, len(images))
    k = digit_size // 8
    names = list(DIRECTIONS_8 if n_directions == 8 else DIRECTIONS_4)
    vecs = np.array([(DIRECTIONS_8 if n_directions == 8 else DIRECTIONS_4)[n] for n in names], np.int64)  # [K, 2]
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    hi = size - digit_size
    n, t_len = n_clips, n_frames

    which = rng.integers(0, len(pool), size=(n, n_digits))
    direction = rng.integers(0, n_directions, size=(n, n_digits))
    speed = rng.integers(0, len(speeds), size=(n, n_digits))
    v = vecs[direction] * np.asarray(speeds)[speed][..., None]  # [N, n_digits, 2]
    p = np.stack([_start(rng, v[..., a], hi) for a in range(2)], -1)
    turn_at = t_len // 2 if turn else t_len
    direction2 = np.full(n, -1, np.int64)
    u = rng.random((n, n_directions))  # tie-breaking scores for the turn's direction
    pos = np.zeros((n, n_digits, t_len, 2), np.int64)
    pos[:, :, 0] = p
    for t in range(t_len - 1):
        if t == turn_at:
            s = np.asarray(speeds)[speed[:, 0]][:, None, None]
            q = p[:, 0, None, :] + vecs[None] * s  # [N, K, 2] first step in each direction
            ok = np.all((q >= 0) & (q <= hi), -1)
            now = np.sign(v[:, 0])
            ok &= np.arange(n_directions)[None] != direction[:, :1]
            ok &= np.any(vecs[None] != now[:, None], -1)
            assert ok.any(-1).all(), "size >= digit_size + 2 * max(speeds) leaves a turn in every position"
            direction2 = np.argmax(np.where(ok, u, -1.0), -1)
            v[:, 0] = vecs[direction2] * s[:, 0]
        p, v = _reflect(p, v, hi)
        pos[:, :, t + 1] = p

    frames = np.zeros((n, t_len, size, size), np.float32)
    grid = np.arange(digit_size)
    ni, ti = np.arange(n)[:, None, None, None], np.arange(t_len)[None, :, None, None]
    for j in range(n_digits):
        rows = (pos[:, j, :, 0, None] + grid)[..., :, None]  # [N, T, D, 1]
        cols = (pos[:, j, :, 1, None] + grid)[..., None, :]  # [N, T, 1, D]
        sprites = images[pool[which[:, j]]].repeat(k, -2).repeat(k, -1)  # [N, D, D]: each pixel a k×k block
        frames[ni, ti, rows, cols] = np.maximum(frames[ni, ti, rows, cols], sprites[:, None])

    vocab = caption_vocab(n_directions)
    ix = {w: i for i, w in enumerate(vocab)}
    labels = targets[pool][which]  # [N, n_digits]
    cols = [np.full(n, ix["digit"]), np.array([ix[str(d)] for d in labels[:, 0]]), np.full(n, ix["moves"]),
            np.array([ix[names[d]] for d in direction[:, 0]])]
    if turn:
        cols += [np.full(n, ix["then"]), np.array([ix[names[d]] for d in direction2])]
    cols.append(np.full(n, ix["<eos>"]))
    return {
        "frames": frames[..., None],
        "digit": labels[:, 0],
        "digits": labels,
        "direction": direction[:, 0].astype(np.int32),
        "direction2": direction2.astype(np.int32),
        "speed": speed[:, 0].astype(np.int32),
        "positions": pos.astype(np.int32),
        "source": pool[which].astype(np.int32),
        "caption": np.stack(cols, 1).astype(np.int32),
        "caption_vocab": vocab,
        "direction_names": names,
        "speeds": speeds,
        "turn_at": turn_at,
    }


def tfds_moving_mnist(split: str = "test", *, n_clips: int | None = None, data_dir=None) -> np.ndarray:
    """Moving MNIST through ``tfds.data_source("moving_mnist")`` (downloads; not used in tests): frames
    ``[N, 20, 64, 64, 1]`` float32 in [0, 1], unlabelled. TFDS ships only the ``test`` split (10,000 clips)."""
    import tensorflow_datasets as tfds

    src = tfds.data_source("moving_mnist", split=split, data_dir=data_dir)
    count = len(src) if n_clips is None else min(n_clips, len(src))
    return np.stack([np.asarray(src[i]["image_sequence"], np.float32) / 255.0 for i in range(count)])
