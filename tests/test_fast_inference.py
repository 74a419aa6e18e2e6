"""The CPU inference path of issue 7: every shortcut must give what the plain computation gives."""
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nibabel.processing import resample_from_to

from conftest import blob_volume
from ldreg.defaults import REFINE_SPACINGS, REFINE_STEPS
from ldreg.preprocessing import Preprocessing, percentiles, resample_to_grid
from ldreg.io import field_to_itk_array, save_volume
from ldreg.modelfile import save_model
from ldreg.networks import (CascadeSpec, affine_field, build_network, compose_after_affine, prepare_for_inference)
from ldreg.register import Registrar, write_outputs
from ldreg.speed_profile import STAGES, profile_one
from ldreg.warp import compose, grid_sample_threaded, identity_grid


def _smooth_field(shape, amplitude, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, *[max(2, s // 4) for s in shape], generator=g)
    return amplitude * F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def test_percentiles_equal_numpy():
    data = np.random.default_rng(0).normal(size=(13, 7, 9)).astype(np.float32)
    qs = [0, 0.5, 1, 50, 99, 99.5, 100]
    np.testing.assert_allclose(percentiles(data, qs), np.percentile(data, qs), rtol=1e-6)
    np.testing.assert_allclose(percentiles(np.asfortranarray(data), qs), np.percentile(data, qs), rtol=1e-6)


def test_resampling_matches_nibabel_inside_and_shortcuts_whole_voxel_shifts():
    rng = np.random.default_rng(0)
    data = rng.random((30, 34, 28)).astype(np.float32)
    source = np.array([[1.2, 0.1, 0, 3], [0, -1.1, 0.2, -5], [0.05, 0, 1.3, 2], [0, 0, 0, 1]])
    target = np.diag([1.7, 1.5, 1.6, 1.0])
    target[:3, 3] = [5, -40, 8]
    ours = resample_to_grid(data, source, (20, 22, 18), target, order=1)
    theirs = np.asarray(resample_from_to(nib.Nifti1Image(data, source), ((20, 22, 18), target), order=1).dataobj)
    inside = (ours > 0) & (theirs > 0)  # the two differ only in how they fade out at the border
    assert inside.mean() > 0.3
    np.testing.assert_allclose(ours[inside], theirs[inside], atol=1e-5)
    # a grid shifted by whole voxels: a crop/pad, exactly what interpolation gives
    shifted = source.copy()
    shifted[:3, 3] += source[:3, :3] @ np.array([2, -3, 1])
    exact = np.asarray(resample_from_to(nib.Nifti1Image(data, source), ((30, 34, 28), shifted), order=1).dataobj)
    np.testing.assert_array_equal(resample_to_grid(data, source, (30, 34, 28), shifted, 1), exact)
    labels = rng.integers(0, 9, (30, 34, 28)).astype(np.int32)
    warped = resample_to_grid(labels, source, (20, 22, 18), target, order=0)
    assert warped.dtype == np.int32 and set(np.unique(warped)) <= set(np.unique(labels))


@pytest.mark.parametrize("depth", [16, 15])  # 15: not divisible by the threads, plain path
def test_threaded_grid_sample_equals_grid_sample(depth):
    torch.set_num_threads(2)
    image = torch.rand(1, 2, 12, 10, 14)
    grid = torch.rand(1, depth, 9, 11, 3) * 2.2 - 1.1
    with torch.inference_mode():
        for mode in ("bilinear", "nearest"):
            expected = F.grid_sample(image, grid, mode=mode, padding_mode="border", align_corners=True)
            torch.testing.assert_close(grid_sample_threaded(image, grid, mode, "border"), expected)


def test_closed_form_affine_composition_equals_sampled_composition_inside():
    shape = (20, 24, 16)
    matrix = torch.tensor([[[1.05, 0.03, 0.0], [-0.02, 0.97, 0.04], [0.01, 0.0, 1.02]]])
    translation = torch.tensor([[0.8, -1.2, 0.5]])
    affine = affine_field(matrix, translation, shape)
    # the broadcast form equals the textbook (M - I)(x - c) + t
    x = identity_grid(shape)
    centred = x - torch.tensor([(s - 1) / 2 for s in shape]).view(3, 1, 1, 1)
    textbook = torch.einsum("ij,j...->i...", matrix[0] - torch.eye(3), centred) + translation[0].view(3, 1, 1, 1)
    torch.testing.assert_close(affine[0], textbook, atol=1e-5, rtol=0)
    step = _smooth_field(shape, 1.5)
    closed, sampled = compose_after_affine(affine, matrix, step), compose(affine, step)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))  # sampling clamps at the border
    torch.testing.assert_close(closed[inner], sampled[inner], atol=1e-4, rtol=0)


def _strong_student(flow_level=0):
    torch.manual_seed(0)
    model = build_network(CascadeSpec(kind="student", width=8, depth=3, affine=True, affine_width=4,
                                      flow_level=flow_level))
    for stage in model.stages:  # a field of a few voxels instead of the near-zero initial one
        torch.nn.init.normal_(stage.flow.weight, std=1.0)
    return model.eval()


@pytest.mark.parametrize("flow_level", [0, 1, 2])
def test_bfloat16_channels_last_field_is_close_to_float32(flow_level):
    model = _strong_student(flow_level)
    moving, fixed = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.inference_mode():
        reference = model(moving, fixed)
        fast = prepare_for_inference(model, "bfloat16", channels_last=True)(moving, fixed, warp=False)
    assert "warped" not in fast and fast["flow"].dtype == torch.float32 and fast["flow"].is_contiguous()
    scale = reference["flow"].abs().max()
    assert scale > 0.5  # a real field, not the identity
    # bf16 keeps 8 bits of mantissa: within a few percent of the field's size
    assert (fast["flow"] - reference["flow"]).abs().max() < 0.05 * scale


def test_prepare_for_inference_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match="precision must be one of"):
        prepare_for_inference(_strong_student(), "float16")


def _pair_on_grid(tmp_path, shape, spacing):
    image, labels = blob_volume(shape, radius=min(shape) / 3)
    moved, _ = blob_volume(shape, centre=[s / 2 + 1.5 for s in shape], radius=min(shape) / 3)
    affine = np.diag([spacing] * 3 + [1.0])
    paths = {"moving": tmp_path / "moving.nii", "fixed": tmp_path / "fixed.nii", "labels": tmp_path / "labels.nii"}
    nib.save(nib.Nifti1Image(moved, affine), paths["moving"])
    nib.save(nib.Nifti1Image(image, affine), paths["fixed"])
    nib.save(nib.Nifti1Image(labels.astype(np.int16), affine), paths["labels"])
    return paths, affine


def test_on_grid_shortcut_gives_what_the_general_path_gives(tmp_path):
    """Images already on the model's grid skip every map between grids; the same fixed image
    stored with its first axis flipped forces the general path, whose answer must agree."""
    prep = Preprocessing(spacing_mm=2.0, grid=(32, 32, 32))
    model_path = tmp_path / "student.pt"
    save_model(model_path, _strong_student(), prep, {}, "student")
    paths, affine = _pair_on_grid(tmp_path, (32, 32, 32), 2.0)
    registrar = Registrar(model_path)
    fast = registrar.register(paths["moving"], paths["fixed"], paths["labels"])
    flipped_affine = affine @ np.array([[-1, 0, 0, 31], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    flipped = np.ascontiguousarray(np.flip(np.asarray(nib.load(paths["fixed"]).dataobj), 0))
    nib.save(nib.Nifti1Image(flipped, flipped_affine), tmp_path / "fixed_flipped.nii")
    general = registrar.register(paths["moving"], tmp_path / "fixed_flipped.nii", paths["labels"])
    assert np.abs(fast["field"]).max() > 0.5
    np.testing.assert_allclose(np.flip(general["warped"], 0), fast["warped"], atol=1e-4)
    # the field is in fixed voxels: along the flipped axis it changes sign
    unflipped = np.flip(general["field"], 1) * np.array([-1, 1, 1]).reshape(3, 1, 1, 1)
    np.testing.assert_allclose(unflipped, fast["field"], atol=1e-4)
    assert (np.flip(general["warped_labels"], 0) != fast["warped_labels"]).mean() < 0.001
    assert fast["warped_labels"].dtype == np.int16  # the label file's own type
    write_outputs(fast, tmp_path / "w.nii", tmp_path / "f.nii.gz", tmp_path / "l.nii")
    written = nib.load(tmp_path / "f.nii.gz")  # for ITK-based tools: mm, LPS, (D, H, W, 1, 3)
    np.testing.assert_allclose(np.asarray(written.dataobj), field_to_itk_array(fast["field"], affine), rtol=1e-6)
    write_outputs(fast, tmp_path / "w.nii", tmp_path / "fv.nii.gz", field_in_fixed_voxels=True)
    np.testing.assert_allclose(np.asarray(nib.load(tmp_path / "fv.nii.gz").dataobj), np.moveaxis(fast["field"], 0, -1))
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "l.nii").dataobj), fast["warped_labels"])


def test_fortran_ordered_writing_keeps_the_data(tmp_path):
    data = np.random.default_rng(0).random((5, 6, 7, 3)).astype(np.float32)
    for array in (data, np.asfortranarray(data), np.moveaxis(np.moveaxis(data, -1, 0).copy(), 0, -1)):
        save_volume(tmp_path / "x.nii", array, np.eye(4))
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "x.nii").dataobj), data)


def test_profile_one_times_every_stage(tmp_path):
    prep = Preprocessing(spacing_mm=2.0, grid=(32, 32, 32))
    model_path = tmp_path / "student.pt"
    save_model(model_path, _strong_student(True), prep, {}, "student")
    row = profile_one(str(model_path), "float32_cl", [16, 24, 32], threads=1, repeats=2, warmup=1)
    assert all(row[f"{s}_s"] > 0 for s in STAGES)
    assert row["total_min_s"] <= row["total_s"] <= 1.5 * sum(row[f"{s}_s"] for s in STAGES)
    assert row["peak_rss_mb"] > 50 and row["write_nii_gz_s"] > 0
    # a scan at its own shape and spacing: preprocessed onto the model's grid, outputs back on the scan's
    native = profile_one(str(model_path), "float32", [32, 32, 32], threads=1, repeats=1, warmup=0,
                         native={"shape": [40, 48, 44], "spacing_mm": 1.0})
    assert all(native[f"{s}_s"] > 0 for s in STAGES)
    scan = Registrar(model_path)
    with tempfile.TemporaryDirectory() as tmp:
        from ldreg.speed_profile import _profile_inputs

        paths = _profile_inputs(Path(tmp), (40, 48, 44), 1.0, 0)
        # a brain pair: the template and a rigidly moved copy, with labels of the moved copy
        fixed, moving = (np.asarray(nib.load(paths[k]).dataobj) for k in ("fixed", "moving"))
        labels = np.asarray(nib.load(paths["labels"]).dataobj)
        assert (fixed > 0).mean() > 0.2 and not np.allclose(fixed, moving) and len(np.unique(labels)) > 10
        result = scan.register(paths["moving"], paths["fixed"], paths["labels"])
    assert result["warped"].shape == (40, 48, 44) and result["field"].shape[-3:] == (40, 48, 44)


def test_the_speed_table_times_the_network_stage_the_profile_times(tmp_path):
    """One way to time the register path: time_cpu's rows are profile_one's network stage."""
    from ldreg.timing import time_model_grid

    prep = Preprocessing(spacing_mm=2.0, grid=(24, 24, 24))
    model_path = tmp_path / "student.pt"
    save_model(model_path, _strong_student(True), prep, {}, "student")
    rows = time_model_grid(model_path, [(24, 24, 24)], [1], repeats=3, warmup=1)
    assert len(rows) == 1 and rows[0]["grid"] == "24x24x24" and rows[0]["threads"] == 1
    row = rows[0]
    assert 0 < row["seconds_min"] <= row["seconds"] and row["peak_rss_mb"] > 50 and row["gflops"] > 0
    # the same measurement as the profile's network column: within a factor of the other's noise
    profile = profile_one(str(model_path), "float32", [24, 24, 24], threads=1, repeats=3, warmup=1)
    assert profile["network_min_s"] <= profile["network_s"]
    assert 0.2 < row["seconds"] / profile["network_s"] < 5


def test_register_refinement_on_the_scan_recovers_a_known_shift_coarse_to_fine(tmp_path):
    from ldreg.losses import local_ncc_loss
    from ldreg.optimise import refine_schedule

    prep = Preprocessing(spacing_mm=3.0, grid=(24, 24, 24))
    model_path = tmp_path / "student.pt"
    save_model(model_path, build_network(CascadeSpec(kind="student", width=4, depth=3, affine=False)), prep, {}, "s")
    # a textured pair 2 voxels (3 mm) apart at 1.5 mm (a blob's flat background gives local NCC nothing)
    from scipy import ndimage

    texture = ndimage.gaussian_filter(np.random.default_rng(0).random((56, 56, 56)), 2.5)[4:52, 4:52, 4:52]
    texture = ((texture - texture.min()) / np.ptp(texture)).astype(np.float32)
    shifted = np.roll(texture, 2, axis=0)  # moving voxel x + 2 holds fixed voxel x
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    paths = {"moving": tmp_path / "tm.nii", "fixed": tmp_path / "tf.nii", "labels": tmp_path / "tl.nii"}
    nib.save(nib.Nifti1Image(shifted, affine), paths["moving"])
    nib.save(nib.Nifti1Image(texture, affine), paths["fixed"])
    nib.save(nib.Nifti1Image((shifted > 0.5).astype(np.int16), affine), paths["labels"])
    plain = Registrar(model_path).register(paths["moving"], paths["fixed"], paths["labels"])
    levels = refine_schedule(10, (3.0, 1.5))
    assert levels == ((3.0, 10), (1.5, 5))
    refined = Registrar(model_path, refine_levels=levels).register(paths["moving"], paths["fixed"], paths["labels"])
    assert refined["times"]["refine_3mm"] > 0 and refined["times"]["refine_1.5mm"] > 0  # each level timed
    fixed = torch.from_numpy(texture)[None, None]
    loss = lambda r: float(local_ncc_loss(torch.from_numpy(r["warped"])[None, None], fixed))
    assert loss(refined) < 0.7 * loss(plain)
    # the field in fixed voxels: +2 along the first axis inside the volume (the random net's own
    # field is small: the refinement found the shift)
    inside = refined["field"][:, 12:36, 12:36, 12:36]
    assert abs(float(np.median(inside[0])) - 2.0) < 0.5 and abs(float(np.median(inside[1]))) < 0.3
    assert float(np.median(np.abs(plain["field"][0, 12:36, 12:36, 12:36] - 2.0))) > 1.0
    with pytest.raises(ValueError, match="refine_levels"):
        Registrar(model_path, refine_levels=((2.0, -1),))
    with pytest.raises(ValueError, match="coarse to fine"):
        refine_schedule(5, (2.0, 4.0))
    assert refine_schedule(0) == ()
    # K halves at each finer level; a tuple sets each level's iterations, a zero level left out
    assert refine_schedule(10, (4.0, 3.0, 2.0)) == ((4.0, 10), (3.0, 5), (2.0, 2))
    assert refine_schedule((10, 10, 0), (4.0, 3.0, 2.0)) == ((4.0, 10), (3.0, 10))
    with pytest.raises(ValueError, match="one count >= 0 per level"):
        refine_schedule((10, 2), (4.0, 3.0, 2.0))
    # no steps given: register's default, which is for the default levels only
    assert refine_schedule(None) == tuple(zip(REFINE_SPACINGS, REFINE_STEPS))
    with pytest.raises(ValueError, match="give the steps too"):
        refine_schedule(None, (4.0, 2.0))


def test_the_warp_lattice_lies_on_the_source_grid_and_covers_the_fixed_grid():
    from ldreg.register import _lattice

    source = np.diag([2.0, 2.0, 3.0, 1.0])
    source[:3, 3] = [1.0, 0.0, 4.5]  # third axis: off the fixed voxels (a half voxel)
    lattice = _lattice((10, 11, 12), np.eye(4), source)
    steps, first = np.diag(lattice.affine)[:3], lattice.affine[:3, 3]
    assert list(steps) == [2, 2, 3] and list(first) == [-1, 0, 0] and lattice.crop == (1, 0, 0)
    # the first two axes' points are the source's own (odd / even voxels); every axis reaches the last voxel
    assert all(f + s * (n - 1) >= size - 1 for f, s, n, size in zip(first, steps, lattice.shape, (10, 11, 12)))
