
import numpy as np
import pytest
import torch

from ldreg.metrics import (dice_per_label, field_error, folding_fraction, hd95, jacobian_determinant, jacobian_summary,
                           landmark_tre, mean_dice, sd_log_jacobian)


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


@pytest.mark.parametrize("depth", [2, 9, 17])
def test_jacobian_by_slabs_equals_the_whole_field_at_once(depth):
    # slab boundaries at planes 8 and 16: each slab's central differences need its neighbours
    field = np.random.default_rng(depth).standard_normal((3, depth, 7, 6))
    u = torch.as_tensor(field)
    j = [list(torch.gradient(u[i])) for i in range(3)]
    for i in range(3):
        j[i][i] = j[i][i] + 1
    whole = np.linalg.det(np.stack([np.stack([g.numpy() for g in row], -1) for row in j], -2))
    np.testing.assert_allclose(jacobian_determinant(field), whole, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(jacobian_determinant(field, slab=3), jacobian_determinant(field, slab=depth))


def test_jacobian_summary_is_folding_and_sdlogj_of_one_determinant():
    field = np.random.default_rng(1).standard_normal((3, 12, 10, 9))
    summary = jacobian_summary(field)
    assert 0 < summary["folding_fraction"] < 1  # a random field folds somewhere, not everywhere
    assert summary == {"folding_fraction": folding_fraction(field), "sdlogj": sd_log_jacobian(field)}


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


# --- conventions of MONAI and Learn2Reg (issue 15): checked on random maps, anisotropic spacing


def _random_label_maps(seed, shape=(24, 28, 20), labels=4):
    """Two smooth random label maps (blobs), the second a perturbed copy of the first."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    out = []
    base = ndi.gaussian_filter(rng.normal(size=(labels, *shape)), (0, 3, 3, 3))
    for noise in (0.0, 0.6):
        field = base + noise * ndi.gaussian_filter(rng.normal(size=base.shape), (0, 2, 2, 2))
        out.append((field.argmax(0) + 1) * (field.max(0) > 0.02))
    return out[0].astype(np.int32), out[1].astype(np.int32)


def _one_hot(m, labels):
    import torch

    return torch.from_numpy(np.stack([m == k for k in labels])[None].astype(np.float32))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_and_hd95_agree_with_monai_on_random_maps(seed):
    from monai.metrics import compute_dice, compute_hausdorff_distance

    pred, truth = _random_label_maps(seed)
    labels = [k for k in np.unique(truth) if k]
    spacing = (1.5, 1.0, 2.5)
    ours_dice, ours_hd = dice_per_label(pred, truth, labels), hd95(pred, truth, spacing, labels)
    p, t = _one_hot(pred, labels), _one_hot(truth, labels)
    monai_dice = compute_dice(p, t, include_background=True)[0].numpy()
    monai_hd = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)[0].numpy()
    np.testing.assert_allclose([ours_dice[k] for k in labels], monai_dice, rtol=1e-6)
    np.testing.assert_allclose([ours_hd[k] for k in labels], monai_hd, rtol=1e-6)


def test_hd95_is_the_larger_directed_percentile_not_the_pooled_one():
    # a cube against the same cube with a thin spike: the spike's points are far from the cube,
    # few enough that pooling both directions would hide them below the 95th percentile
    a = np.zeros((30, 30, 30), np.int32)
    a[5:15, 5:15, 5:15] = 1
    b = a.copy()
    b[9:11, 9:11, 15:28] = 1
    from scipy import ndimage as ndi

    def directed(x, y):
        sx, sy = x & ~ndi.binary_erosion(x), y & ~ndi.binary_erosion(y)
        return np.percentile(ndi.distance_transform_edt(~sy)[sx], 95)

    expected = max(directed(a == 1, b == 1), directed(b == 1, a == 1))
    assert hd95(a, b)[1] == pytest.approx(expected)
    assert expected > 0  # the spike shows


def test_a_structure_lost_by_the_warp_scores_zero_and_one_absent_from_the_truth_is_nan():
    truth = np.zeros((8, 8, 8), np.int32)
    truth[:4] = 1
    truth[6:, 6:, 6:] = 2
    pred = np.zeros_like(truth)
    pred[:4] = 1
    pred[0, 0, 0] = 5  # not in the truth
    d = dice_per_label(pred, truth, [1, 2, 5])
    assert d[1] == pytest.approx(2 * 255 / (255 + 256))
    assert d[2] == 0.0
    assert np.isnan(d[5])
    assert mean_dice(pred, truth, [1, 2]) == pytest.approx(d[1] / 2)
    assert np.isnan(hd95(pred, truth, labels=[2])[2])


def test_negative_labels_are_refused_not_wrapped_around():
    a = np.ones((4, 4, 4), np.int32)
    b = a.copy()
    b[0, 0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        dice_per_label(a, b)
    with pytest.raises(ValueError, match="negative"):
        hd95(b, a)


def test_sdlogj_follows_learn2reg_convention():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    field = ndi.gaussian_filter(rng.normal(size=(3, 20, 22, 18)), (0, 2, 2, 2)) * 4
    # independent: central differences by correlation (as the challenge's code does), identity
    # added, determinant, + 3, clipped, log, two voxels cropped on every side
    k = np.array([-0.5, 0, 0.5])
    grads = np.stack([np.stack([ndi.correlate1d(field[i], k, axis=j, mode="constant") for j in range(3)])
                      for i in range(3)])
    jac = np.moveaxis(grads + np.eye(3)[:, :, None, None, None], (0, 1), (-2, -1))
    det = np.linalg.det(jac)[2:-2, 2:-2, 2:-2]
    expected = np.log(np.clip(det + 3, 1e-9, 1e9)).std()
    assert sd_log_jacobian(field) == pytest.approx(expected, rel=1e-9)
    assert sd_log_jacobian(field, "plain") == pytest.approx(np.log(np.clip(jacobian_determinant(field), 1e-9, None)).std())
    with pytest.raises(ValueError, match="convention"):
        sd_log_jacobian(field, "other")
