"""The field `register --field` writes is applied as it is by ITK-based tools (issue 15): ANTs
(antspyx apply_transforms) and SimpleITK (DisplacementFieldTransform) give back the project's own
warped image and labels, on a pair whose fixed image is oblique and flipped."""
import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import blob_volume
from ldreg.cli import register_main
from ldreg.preprocessing import Preprocessing
from ldreg.metrics import mean_dice
from ldreg.modelfile import save_model
from ldreg.networks import CascadeSpec, build_network


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("itk")
    torch.manual_seed(3)
    model = build_network(CascadeSpec(kind="student", width=4, depth=3, affine=False))
    for stage in model.stages:  # a field of a few voxels, so that a misread field shows
        torch.nn.init.normal_(stage.flow.weight, std=0.3)
    model_path = tmp / "m.pt"
    save_model(model_path, model, Preprocessing(spacing_mm=2.0, grid=(32, 32, 32)), {}, "field_test")

    shape = (40, 44, 36)
    image, outer = blob_volume(shape, centre=[20, 22, 18], radius=13)
    _, inner = blob_volume(shape, centre=[15, 22, 18], radius=5)
    image = (image + 0.5 * inner).astype(np.float32)
    labels = (outer + inner).astype(np.int16)
    # fixed: oblique (rotated 20 degrees about z and 10 about x) and flipped in y
    a, b = np.deg2rad(20), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    fixed_affine = np.eye(4)
    fixed_affine[:3, :3] = rz @ rx @ np.diag([1.5, -1.6, 1.4])
    fixed_affine[:3, 3] = [-25, 30, -20]
    moving_affine = np.eye(4)
    moving_affine[:3, :3] = np.diag([-1.5, 1.5, 1.5])
    moving_affine[:3, 3] = [30, -33, -27]
    paths = {}
    for name, data, affine in (("fixed", image, fixed_affine), ("moving", np.roll(image, 2, 0), moving_affine),
                               ("moving_labels", np.roll(labels, 2, 0), moving_affine)):
        paths[name] = str(tmp / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), paths[name])
    for k in ("warped", "field", "warped_labels", "field_vox"):
        paths[k] = str(tmp / f"{k}.nii.gz")
    args = ["--model", str(model_path), "--moving", paths["moving"], "--fixed", paths["fixed"], "--threads", "1"]
    assert register_main([*args, "--warped", paths["warped"], "--field", paths["field"], "--moving-labels",
                          paths["moving_labels"], "--warped-labels", paths["warped_labels"]]) == 0
    assert register_main([*args, "--warped", str(tmp / "w2.nii.gz"), "--field", paths["field_vox"],
                          "--field-in-fixed-voxels"]) == 0
    return paths


def _mask_and_ours(pair):
    fixed = np.asarray(nib.load(pair["fixed"]).dataobj)
    ours = np.asarray(nib.load(pair["warped"]).dataobj)
    labels = np.asarray(nib.load(pair["warped_labels"]).dataobj).astype(np.int32)
    return fixed > 0.1, ours, labels


def _check(pair, theirs, their_labels):
    mask, ours, labels = _mask_and_ours(pair)
    assert np.corrcoef(ours[mask], theirs[mask])[0, 1] >= 0.999
    assert mean_dice(their_labels.astype(np.int32), labels) >= 0.98


def test_written_field_is_an_itk_displacement_field(pair):
    img = nib.load(pair["field"])
    fixed = nib.load(pair["fixed"])
    assert img.shape == (*fixed.shape, 1, 3)
    assert img.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(img.affine, fixed.affine, atol=1e-5)
    # it moves things: a misread or ignored field could not pass the checks below
    mm = np.linalg.norm(np.asarray(img.dataobj)[..., 0, :], axis=-1)
    assert mm.max() > 2.0
    vox = nib.load(pair["field_vox"])
    assert vox.shape == (*fixed.shape, 3)
    # the same field in the two conventions: lengths in mm agree
    lengths = np.linalg.norm(np.einsum("ij,...j->...i", fixed.affine[:3, :3], np.asarray(vox.dataobj)), axis=-1)
    np.testing.assert_allclose(lengths, mm, atol=1e-3)


def test_simpleitk_applies_the_field_as_register_did(pair):
    sitk = pytest.importorskip("SimpleITK")
    fixed = sitk.ReadImage(pair["fixed"], sitk.sitkFloat32)
    field = sitk.ReadImage(pair["field"], sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    out = {}
    for key, interp, pixel in (("moving", sitk.sitkLinear, sitk.sitkFloat32),
                               ("moving_labels", sitk.sitkNearestNeighbor, sitk.sitkInt16)):
        warped = sitk.Resample(sitk.ReadImage(pair[key], pixel), fixed, transform, interp, 0.0)
        # SimpleITK's arrays are (z, y, x): back to NIfTI's (x, y, z)
        out[key] = sitk.GetArrayFromImage(warped).transpose(2, 1, 0)
    _check(pair, out["moving"], out["moving_labels"])


def test_ants_applies_the_field_as_register_did(pair):
    ants = pytest.importorskip("ants")
    fixed = ants.image_read(pair["fixed"])
    image = ants.apply_transforms(fixed, ants.image_read(pair["moving"]), transformlist=[pair["field"]],
                                  interpolator="linear")
    labels = ants.apply_transforms(fixed, ants.image_read(pair["moving_labels"]), transformlist=[pair["field"]],
                                   interpolator="nearestNeighbor")
    _check(pair, image.numpy(), labels.numpy())
