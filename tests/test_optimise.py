"""Per-pair optimisation (ldreg.optimise): real steps on a real shifted pair."""
import numpy as np
import pytest
import torch

from conftest import blob_volume
from ldreg.losses import local_ncc_loss
from ldreg.metrics import folding_fraction, mean_dice
from ldreg.optimise import optimise_field
from ldreg.warp import warp_image, warp_labels


def _pair():
    moving, moving_labels = blob_volume((24, 24, 24), centre=[12, 12, 12], radius=6)
    fixed, fixed_labels = blob_volume((24, 24, 24), centre=[14, 11, 12], radius=6)
    as_t = lambda a: torch.from_numpy(a)[None, None]
    return as_t(moving), as_t(fixed), moving_labels, fixed_labels


def test_a_few_steps_lower_the_similarity_loss_and_raise_dice_without_folding():
    moving, fixed, moving_labels, fixed_labels = _pair()
    field, record = optimise_field(moving, fixed, steps=15, lr=0.5)
    assert record["similarity_end"] < 0.8 * record["similarity_start"]
    assert float(local_ncc_loss(warp_image(moving, field), fixed)) == pytest.approx(record["similarity_end"], rel=1e-4)
    warped = warp_labels(torch.from_numpy(moving_labels)[None, None], field)[0, 0].numpy()
    assert mean_dice(warped, fixed_labels) > mean_dice(moving_labels, fixed_labels) + 0.1
    assert folding_fraction(field[0].numpy()) < 0.005


def test_zero_steps_return_the_start_field_unchanged():
    moving, fixed, _, _ = _pair()
    start = torch.randn(1, 3, 24, 24, 24)
    field, record = optimise_field(moving, fixed, start, steps=0)
    assert field is start and record == {}


def test_refinement_starts_from_the_given_field():
    moving, fixed, _, _ = _pair()
    start = torch.zeros(1, 3, 24, 24, 24)
    start[:, 0], start[:, 1] = -2.0, 1.0  # the true shift (fixed voxel x shows moving's x + u)
    field, record = optimise_field(moving, fixed, start, steps=1, lr=1e-6)
    np.testing.assert_allclose(field.numpy(), start.numpy(), atol=1e-4)
    assert record["similarity_start"] < float(local_ncc_loss(moving, fixed))


def test_bad_options_are_refused():
    moving, fixed, _, _ = _pair()
    with pytest.raises(ValueError, match="resolution"):
        optimise_field(moving, fixed, steps=2, resolution=0)
    with pytest.raises(ValueError, match="start field"):
        optimise_field(moving, fixed, torch.zeros(1, 3, 8, 8, 8), steps=2)


def test_cached_teacher_fields_can_be_refined(tmp_path):
    import pandas as pd

    from ldreg.networks import CascadeSpec, build_network
    from ldreg.training import FlowCache, cache_teacher_flows

    moving, fixed, _, _ = _pair()
    images = {"m": moving, "f": fixed}
    pairs = pd.DataFrame([{"pair_id": "m__f", "moving": "m", "fixed": "f"}, {"pair_id": "f__m", "moving": "f", "fixed": "m"}])
    teacher = build_network(CascadeSpec(kind="teacher", width=4, depth=3, affine=False))
    cache_teacher_flows(teacher, pairs, images, tmp_path / "raw.pt")
    report = cache_teacher_flows(teacher, pairs, images, tmp_path / "refined.pt", refine={"steps": 10, "lr": 0.5})
    assert (report.similarity_end < report.similarity_start).all()
    raw, refined = FlowCache(tmp_path / "raw.pt"), FlowCache(tmp_path / "refined.pt")
    assert refined.get("m__f", (24, 24, 24)).abs().max() > raw.get("m__f", (24, 24, 24)).abs().max() + 0.5
    # register's own refinement (Greedy's scheme) as the refiner: the local NCC falls too
    greedy = cache_teacher_flows(teacher, pairs, images, tmp_path / "greedy.pt", refine={"steps": 10, "method": "greedy"})
    assert (greedy.similarity_end < greedy.similarity_start - 0.05).all()
    assert FlowCache(tmp_path / "greedy.pt").get("m__f", (24, 24, 24)).abs().max() > 0.5
    with pytest.raises(ValueError, match="method"):
        cache_teacher_flows(teacher, pairs, images, tmp_path / "x.pt", refine={"steps": 2, "method": "greedy", "lr": 1})


def test_refinement_works_on_inputs_made_under_inference_mode():
    """Evaluation and register run under torch.inference_mode: the optimiser must still train."""
    moving, fixed, _, _ = _pair()
    with torch.inference_mode():
        m, f, start = moving.clone(), fixed.clone(), torch.zeros(1, 3, 24, 24, 24)
        field, record = optimise_field(m, f, start, steps=5)
    assert record["similarity_end"] < record["similarity_start"]


def test_coarse_to_fine_steps_register_the_pair_too():
    moving, fixed, moving_labels, fixed_labels = _pair()
    field, record = optimise_field(moving, fixed, steps=15, lr=0.5, coarse_fraction=0.6)
    assert field.shape == (1, 3, 24, 24, 24)
    # similarity reported at full resolution at both ends, and it fell
    assert float(local_ncc_loss(warp_image(moving, field), fixed)) == pytest.approx(record["similarity_end"], rel=1e-4)
    assert record["similarity_start"] == pytest.approx(float(local_ncc_loss(moving, fixed)), rel=1e-4)
    assert record["similarity_end"] < 0.8 * record["similarity_start"]
    warped = warp_labels(torch.from_numpy(moving_labels)[None, None], field)[0, 0].numpy()
    assert mean_dice(warped, fixed_labels) > mean_dice(moving_labels, fixed_labels) + 0.1
    with pytest.raises(ValueError, match="coarse_fraction"):
        optimise_field(moving, fixed, steps=2, coarse_fraction=1.5)


def test_half_resolution_field_is_in_its_own_voxels():
    from ldreg.optimise import _voxel_ratio

    # a constant shift of 6 full-resolution voxels along the first axis of a 25-voxel grid is 3
    # voxels of the 13-voxel half grid (end voxels coincide)
    ratio = _voxel_ratio((13, 13, 13), (25, 25, 25), torch.zeros(1))
    assert float(6 * ratio[0, 0, 0, 0, 0]) == pytest.approx(3.0)


def test_the_written_out_adam_matches_torch_adam():
    from ldreg.optimise import _Adam

    torch.manual_seed(0)
    target = torch.randn(50)
    ours, theirs = torch.zeros(50), torch.zeros(50, requires_grad=True)
    adam, reference = _Adam(ours), torch.optim.Adam([theirs], lr=0.3)
    for _ in range(20):
        adam.step(2 * (ours - target) + torch.sin(ours), 0.3)
        reference.zero_grad()
        loss = ((theirs - target) ** 2).sum() - torch.cos(theirs).sum()
        loss.backward()
        reference.step()
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)


def test_separable_filters_equal_a_direct_3d_convolution():
    from ldreg.optimise import box_mean, gaussian_smooth

    volume = torch.rand(1, 2, 9, 10, 11, generator=torch.Generator().manual_seed(1))
    box = torch.nn.functional.conv3d(volume.reshape(2, 1, 9, 10, 11), torch.full((1, 1, 5, 5, 5), 1 / 125), padding=2)
    torch.testing.assert_close(box_mean(volume, 2), box.reshape(1, 2, 9, 10, 11), atol=1e-6, rtol=0)
    # renormalised at the ends: a constant stays constant, the inside is a plain Gaussian
    torch.testing.assert_close(gaussian_smooth(torch.full((1, 3, 8, 9, 10), 2.5), 1.5), torch.full((1, 3, 8, 9, 10), 2.5))
    taps = torch.exp(-torch.arange(-3, 4.0) ** 2 / 2)
    taps /= taps.sum()
    kernel = taps[:, None, None] * taps[None, :, None] * taps[None, None, :]
    inside = torch.nn.functional.conv3d(volume.reshape(2, 1, 9, 10, 11), kernel[None, None])
    torch.testing.assert_close(gaussian_smooth(volume, 1.0)[:, :, 3:6, 3:7, 3:8], inside.reshape(1, 2, 3, 4, 5),
                               atol=1e-5, rtol=0)
