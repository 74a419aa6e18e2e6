
import numpy as np
import pytest

from ldreg.metrics import (dice_per_label, field_error, folding_fraction, hd95, jacobian_determinant, landmark_tre,
                           mean_dice, sd_log_jacobian)


def test_dice_of_known_partial_overlap():
    a = np.zeros((10, 10, 10), np.int32)
    b = np.zeros_like(a)
    a[0:4] = 1  # 400 voxels
    b[2:6] = 1  # 400 voxels, 200 shared
    a[9, 9, 9] = 7  # only in a -> NaN, ignored by the mean
    d = dice_per_label(a, b)
    assert d[1] == pytest.approx(2 * 200 / 800)
    assert np.isnan(d[7])
    assert mean_dice(a, b) == pytest.approx(0.5)


def test_dice_rejects_float_maps_and_mismatched_shapes():
    with pytest.raises(ValueError, match="integer"):
        dice_per_label(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="one shape"):
        dice_per_label(np.zeros((4, 4, 4), int), np.zeros((4, 4, 5), int))


def test_hd95_of_shifted_cube_in_mm():
    a = np.zeros((20, 20, 20), np.int32)
    a[5:15, 5:15, 5:15] = 1
    b = np.roll(a, 2, axis=0)
    # every surface point is at most 2 voxels (4 mm at 2 mm spacing) from the other surface
    assert hd95(a, b, spacing=(2, 1, 1))[1] == pytest.approx(4.0)


def test_jacobian_of_linear_map_is_its_determinant():
    m = np.array([[1.2, 0.1, 0.0], [0.0, 0.9, 0.2], [0.1, 0.0, 1.1]])
    grid = np.stack(np.meshgrid(*[np.arange(8)] * 3, indexing="ij"))
    field = np.einsum("ij,jxyz->ixyz", m - np.eye(3), grid)
    np.testing.assert_allclose(jacobian_determinant(field), np.linalg.det(m), rtol=1e-9)
    assert folding_fraction(field) == 0.0
    assert sd_log_jacobian(field) == pytest.approx(0.0, abs=1e-9)


def test_folding_field_is_detected():
    grid = np.stack(np.meshgrid(*[np.arange(8)] * 3, indexing="ij")).astype(float)
    field = np.zeros_like(grid)
    field[0] = -2 * grid[0]  # x -> -x: folds everywhere
    assert folding_fraction(field) == 1.0


def test_tre_and_field_error():
    field = np.zeros((3, 10, 10, 10))
    field[1] = 1.0
    tre = landmark_tre([[5, 5, 5]], [[5, 6, 5]], field, spacing=(1, 2, 1))
    assert tre[0] == pytest.approx(0.0)
    err = field_error(field, np.zeros_like(field), spacing=(1, 2, 1))
    assert err["epe_mean_mm"] == pytest.approx(2.0)


def test_dice_116_labels_at_128_cubed_is_fast_enough_to_benchmark():
    # correctness on a big map; the speed figure itself is in benchmarks/ (not asserted here)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 117, (128, 128, 128)).astype(np.int32)
    d = dice_per_label(a, a)
    assert len(d) == 116 and all(v == 1.0 for v in d.values())
