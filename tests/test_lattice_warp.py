"""The compiled one-pass warp (ldreg.lattice_warp) against torch's passes and known answers."""
import nibabel as nib
import numpy as np
import pytest
import torch

from ldreg.lattice_warp import warp_through_lattice
from ldreg.warp import grid_sample_channels_last, normalising_map, upsample_linear


def _identity_lattice(lattice_shape, steps, crops, shift=(0.0, 0.0, 0.0)):
    """Lattice point i -> output voxel steps * i - crops, plus ``shift`` (image voxels)."""
    axes = [np.arange(n) * s - c for n, s, c in zip(lattice_shape, steps, crops)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).astype(np.float32)
    return points + np.asarray(shift, dtype=np.float32)


def test_known_shift_moves_a_ramp_and_the_labels_by_that_shift():
    """Trilinear interpolation reproduces a linear image exactly: warping by a shift of
    (1.5, 0, -0.25) voxels reads the ramp's value there; labels move by whole voxels (1.5 rounds
    to 2, ties to even; -0.25 to 0) and the border is clamped as grid_sample's border padding."""
    shape = (9, 10, 11)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    ramp = 2.0 * z + 0.5 * y - 1.0 * x
    labels = (z.astype(np.int32) * 100 + y.astype(np.int32) * 10 + x.astype(np.int32) % 10).astype(np.int32)
    steps, crops = (2, 3, 1), (0, 1, 0)
    lattice_shape = (5, 5, 11)  # reaches past the last voxel along every axis
    shift = (1.5, 0.0, -0.25)
    lattice = _identity_lattice(lattice_shape, steps, crops, shift)
    warped, warped_labels, _ = warp_through_lattice(lattice, steps, crops, shape, ramp, labels, threads=2)
    pz, py, px = (np.clip(c + s, 0, n - 1) for c, s, n in zip((z, y, x), shift, shape))
    np.testing.assert_allclose(warped, 2.0 * pz + 0.5 * py - 1.0 * px, atol=1e-4)
    nz, ny, nx = (np.rint(c).astype(int) for c in (pz, py, px))
    np.testing.assert_array_equal(warped_labels, labels[nz, ny, nx])
    assert warped_labels[0, 0, 0] == labels[2, 0, 0]  # 1.5 -> 2 (even); -0.25 clamped to 0
    assert warped_labels.dtype == np.int32 and warped.dtype == np.float32


@pytest.mark.parametrize("threads", [1, 3])
def test_equals_torch_upsampling_then_grid_sample(threads):
    """What register's torch path does (upsample the map, grid_sample image bilinear and labels
    nearest): the same to float rounding, on a random smooth map that leaves the volume."""
    rng = np.random.default_rng(threads)
    image = rng.random((12, 14, 13), dtype=np.float32)
    labels = rng.integers(0, 9, image.shape).astype(np.int32)
    steps, crops, shape = (3, 2, 3), (1, 0, 2), (16, 17, 19)
    lattice_shape = tuple(int(np.ceil((n - 1 + c) / s)) + 1 for n, s, c in zip(shape, steps, crops))
    lattice = _identity_lattice(lattice_shape, steps, crops) * 0.8 + rng.normal(0, 1.5, lattice_shape + (3,)).astype(np.float32)
    field_lattice = rng.normal(0, 2, lattice_shape + (3,)).astype(np.float32)
    warped, warped_labels, field = warp_through_lattice(lattice, steps, crops, shape, image, labels, threads=threads,
                                                        field=field_lattice)
    norm = np.vstack([normalising_map(image.shape), [0, 0, 0, 1]])
    units = torch.from_numpy(lattice.reshape(-1, 3) @ norm[:3, :3].T.astype(np.float32) + norm[:3, 3].astype(np.float32))
    grid = upsample_linear(units.view(*lattice_shape, 3), (2, 1, 0), steps[::-1], crops[::-1], shape[::-1])
    expected = grid_sample_channels_last(torch.from_numpy(image)[None], grid, "bilinear")[0].numpy()
    np.testing.assert_allclose(warped, expected, atol=2e-5)
    expected_labels = grid_sample_channels_last(torch.from_numpy(labels).float()[None], grid, "nearest")[0].numpy()
    # a point within float rounding of a voxel boundary may round either way
    assert (warped_labels != expected_labels).mean() < 1e-3
    # the field: torch's upsampling by whole factors, in NIfTI's memory order
    expected_field = upsample_linear(torch.from_numpy(field_lattice).permute(3, 2, 1, 0), (1, 2, 3), steps[::-1],
                                     crops[::-1], shape[::-1]).permute(0, 3, 2, 1)
    assert field.shape == (3, *shape) and field.transpose(0, 3, 2, 1).flags.c_contiguous
    np.testing.assert_allclose(field, expected_field.numpy(), atol=1e-5)
    alone, none, no_field = warp_through_lattice(lattice, steps, crops, shape, image, None, threads=threads)
    np.testing.assert_array_equal(alone, warped)
    assert none is None and no_field is None


def test_a_single_slice_volume_and_lattice():
    """A volume one voxel thick and a lattice one point thick: every output reads that slice."""
    image = np.arange(20, dtype=np.float32).reshape(1, 4, 5)
    lattice = _identity_lattice((1, 4, 5), (1, 1, 1), (0, 0, 0), shift=(0.3, 0.0, 0.0))
    warped, labels, field = warp_through_lattice(lattice, (1, 1, 1), (0, 0, 0), (3, 4, 5), image, image.astype(np.int32),
                                                 field=lattice)
    np.testing.assert_allclose(field[0], 0.3, atol=1e-6)  # the lattice's first channel everywhere
    np.testing.assert_allclose(warped, np.broadcast_to(image, (3, 4, 5)), atol=1e-6)
    np.testing.assert_array_equal(labels, np.broadcast_to(image.astype(np.int32), (3, 4, 5)))


def test_registrar_compiled_warp_matches_torch_path_on_a_pair_off_the_model_grid(tmp_path):
    """register-batch's compiled warp and register's torch passes give the same image, labels
    and field for a pair at 1.5 mm registered by a 3 mm model (maps on a lattice)."""
    from conftest import blob_volume
    from ldreg.modelfile import save_model
    from ldreg.networks import CascadeSpec, build_network
    from ldreg.preprocessing import Preprocessing
    from ldreg.register import Registrar

    torch.manual_seed(0)
    prep = Preprocessing(spacing_mm=3.0, grid=(24, 24, 24))
    model_path = tmp_path / "student.pt"
    save_model(model_path, build_network(CascadeSpec(kind="student", width=4, depth=3, affine=False)), prep, {}, "s")
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    paths = {}
    for name, centre in [("fixed", [20, 22, 18]), ("moving", [22, 21, 18])]:
        image, mask = blob_volume((40, 44, 36), centre=centre, radius=11)
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), paths[name])
    nib.save(nib.Nifti1Image(mask.astype(np.int16), affine), tmp_path / "labels.nii.gz")
    results = [Registrar(model_path, compiled_warp=c).register(paths["moving"], paths["fixed"], tmp_path / "labels.nii.gz")
               for c in (False, True)]
    torch_path, compiled = results
    np.testing.assert_allclose(compiled["warped"], torch_path["warped"], atol=1e-4)
    np.testing.assert_allclose(compiled["field"], torch_path["field"], atol=1e-5)
    assert compiled["warped_labels"].dtype == torch_path["warped_labels"].dtype == np.int16
    assert (compiled["warped_labels"] != torch_path["warped_labels"]).mean() < 1e-3
    assert compiled["warped_labels"].sum() > 0
