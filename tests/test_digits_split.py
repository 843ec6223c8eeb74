"""``seqjax.tasks.classification.digits_split``: the one loader of the 8×8 digits that the MLP and RNN experiments use."""

import numpy as np
import pytest

from seqjax.tasks.classification import digit_images, digits, digits_split


def test_digits_split_is_the_first_n_train_of_one_seeded_shuffle():
    images, targets = digit_images()
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32 and targets.dtype == np.int32
    assert images.min() == 0.0 and images.max() == 1.0  # 0–16 ink over 16
    x, y, xt, yt = digits_split()
    perm = np.random.default_rng(0).permutation(1797)
    assert x.shape == (1437, 8, 8) and xt.shape == (360, 8, 8)
    np.testing.assert_array_equal(x, images[perm[:1437]])
    np.testing.assert_array_equal(yt, targets[perm[1437:]])
    xf, yf, xtf, _ = digits_split(flat=True)
    np.testing.assert_array_equal(xf, x.reshape(1437, 64))  # flat: the pixels row by row
    np.testing.assert_array_equal(yf, y)
    assert xtf.shape == (360, 64)


def test_sequential_digits_read_the_same_images_pixel_by_pixel():
    images, _ = digit_images()
    x, y, xt, yt = digits(seed=3)
    rows = {img.tobytes() for img in images.reshape(1797, 64)}
    assert x.shape == (1438, 64, 1) and xt.shape == (359, 64, 1)
    assert all(s.tobytes() in rows for s in x[:20, :, 0])


def test_digits_split_names_a_bad_n_train():
    with pytest.raises(ValueError, match="n_train must be in"):
        digits_split(1797)
