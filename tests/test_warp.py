import numpy as np
import pytest
import torch

from ldreg.warp import compose, integrate_velocity, warp_image, warp_labels


def _shift(shape, d):
    field = torch.zeros(1, 3, *shape)
    for i, v in enumerate(d):
        field[0, i] = v
    return field


def test_integer_shift_matches_roll_inside():
    image = torch.rand(1, 1, 16, 18, 20)
    warped = warp_image(image, _shift(image.shape[2:], (2, -1, 3)))
    # sampling at x + d equals rolling by -d, away from the borders
    rolled = np.roll(image[0, 0].numpy(), shift=(-2, 1, -3), axis=(0, 1, 2))
    np.testing.assert_allclose(warped[0, 0, 3:-3, 3:-3, 4:-4].numpy(), rolled[3:-3, 3:-3, 4:-4], atol=1e-5)


def test_identity_returns_input_exactly_including_borders():
    image = torch.rand(2, 1, 8, 8, 8)
    np.testing.assert_allclose(warp_image(image, torch.zeros(2, 3, 8, 8, 8)).numpy(), image.numpy(), atol=1e-6)


def test_compose_two_shifts_is_their_sum():
    shape = (12, 12, 12)
    composed = compose(_shift(shape, (1, 2, 0)), _shift(shape, (0, -1, 3)))
    np.testing.assert_allclose(composed[0, :, 3:-3, 3:-3, 3:-3].numpy(),
                               _shift(shape, (1, 1, 3))[0, :, 3:-3, 3:-3, 3:-3].numpy(), atol=1e-5)


def test_compose_equals_sequential_warping_for_smooth_fields():
    shape = (20, 20, 20)
    smooth = lambda c: torch.nn.functional.interpolate(torch.randn(1, c, 3, 3, 3), size=shape, mode="trilinear", align_corners=True)
    a, b, image = smooth(3), smooth(3), smooth(1)
    chained = warp_image(warp_image(image, a), b)
    once = warp_image(image, compose(a, b))
    # equal up to the extra interpolation of the chain; far from the result of one field alone
    inner = (..., slice(4, -4), slice(4, -4), slice(4, -4))
    assert (chained - once)[inner].abs().max() < 0.02 * (image.max() - image.min())
    assert (chained - warp_image(image, a))[inner].abs().max() > 0.1


def test_label_warp_keeps_label_set_and_dtype():
    labels = torch.randint(0, 5, (1, 1, 10, 10, 10), dtype=torch.int32) * 1000
    field = torch.randn(1, 3, 10, 10, 10) * 1.5
    out = warp_labels(labels, field)
    assert out.dtype == torch.int32
    assert set(out.unique().tolist()) <= set(labels.unique().tolist())


def test_scaling_and_squaring_inverse():
    v = torch.nn.functional.interpolate(torch.randn(1, 3, 3, 3, 3), size=(16, 16, 16), mode="trilinear", align_corners=True)
    roundtrip = compose(integrate_velocity(v), integrate_velocity(-v))
    assert roundtrip[..., 3:-3, 3:-3, 3:-3].abs().max() < 0.1


@pytest.mark.parametrize("bad", [torch.zeros(3, 8, 8, 8), torch.zeros(1, 2, 8, 8, 8), torch.zeros(1, 3, 8, 8, 8, dtype=torch.int64)])
def test_bad_field_shapes_and_dtypes_raise_value_error(bad):
    with pytest.raises(ValueError, match="expected"):
        warp_image(torch.zeros(1, 1, 8, 8, 8), bad)


def test_field_on_another_grid_raises():
    with pytest.raises(ValueError, match="does not match"):
        warp_image(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 3, 8, 8, 9))


def test_axis_aligned_sampling_equals_grid_sample():
    from ldreg.warp import identity_grid, sample_at, sample_axis_aligned

    torch.manual_seed(0)
    volume = torch.randn(3, 6, 7, 5)
    shape = (13, 9, 11)
    scale, offset = (0.45, 0.8, 0.5), (-0.7, 0.3, 0.2)  # some points fall outside: border clamping
    points = identity_grid(shape) * torch.tensor(scale).view(3, 1, 1, 1) + torch.tensor(offset).view(3, 1, 1, 1)
    expected = sample_at(volume, points, "bilinear")
    got = sample_axis_aligned(volume, scale, offset, shape)
    assert got.shape == (3, *shape)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_one_pass_affine_sampling_grid_equals_sampling_at_mapped_points():
    """register's warp: grid_sample's grid built as an affine map of the fixed voxel plus a 3x3
    matrix times the field gives what sampling at the explicitly mapped points gives."""
    import numpy as np
    from ldreg.warp import (affine_plus_linear, grid_sample_channels_last, identity_grid, normalising_map,
                            sample_at)

    torch.manual_seed(0)
    moving = torch.randn(1, 9, 8, 10)
    shape = (12, 7, 11)
    field = torch.randn(*shape, 3)  # channels-last, in some frame's voxels
    to_moving = np.array([[0.6, 0.1, 0.0, 0.5], [0.0, 0.7, -0.1, 1.0], [0.05, 0.0, 0.8, -0.3]])
    linear = np.array([[0.9, 0.0, 0.1], [0.0, 1.1, 0.0], [0.2, 0.0, 1.0]])
    # explicit: the moving voxel of each fixed voxel y is to_moving(y) + linear @ field(y)
    y = identity_grid(shape).permute(1, 2, 3, 0)
    points = (y @ torch.tensor(to_moving[:, :3], dtype=torch.float32).T + torch.tensor(to_moving[:, 3], dtype=torch.float32)
              + field @ torch.tensor(linear, dtype=torch.float32).T)
    expected = sample_at(moving, points.permute(3, 0, 1, 2), "bilinear")
    norm = np.vstack([normalising_map(moving.shape[1:]), [0, 0, 0, 1]])
    grid = affine_plus_linear((norm @ np.vstack([to_moving, [0, 0, 0, 1]]))[:3], norm[:3, :3] @ linear, field)
    got = grid_sample_channels_last(moving, grid, "bilinear")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_whole_factor_upsampling_equals_trilinear_interpolation_and_keeps_the_cut():
    from ldreg.warp import upsample_linear

    coarse = torch.rand(5, 6, 7, 3, generator=torch.Generator().manual_seed(0))
    fine = upsample_linear(coarse, (2, 1, 0), (3, 2, 2), (1, 0, 1), (17, 10, 8))
    reference = torch.nn.functional.interpolate(coarse.permute(3, 0, 1, 2)[None], size=(9, 11, 19), mode="trilinear",
                                                align_corners=True)[0].permute(1, 2, 3, 0)
    torch.testing.assert_close(fine, reference[1:9, 0:10, 1:18], atol=1e-6, rtol=0)
    assert fine.shape == (8, 10, 17, 3) and fine.is_contiguous()  # the outermost cut last: still one block


@pytest.mark.parametrize("depth", [7, 8, 3])
def test_threaded_grid_sample_equals_one_call_for_any_depth(depth):
    from ldreg.warp import grid_sample_threaded

    g = torch.Generator().manual_seed(depth)
    image = torch.rand(1, 2, 6, 7, 8, generator=g)
    grid = torch.rand(1, depth, 5, 4, 3, generator=g) * 2 - 1
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = grid_sample_threaded(image, grid, "bilinear", "border")
    finally:
        torch.set_num_threads(previous)
    expected = torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)
    torch.testing.assert_close(out, expected)
