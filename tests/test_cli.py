import json

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import blob_volume
from ldreg.cli import export_model, main, register_main
from ldreg.metrics import mean_dice
from ldreg.modelfile import load_model, save_model



def _anatomy():
    """A brain-like blob with two labelled structures, 1.5 mm voxels, on a 40x44x36 grid."""
    image, outer = blob_volume((40, 44, 36), centre=[20, 22, 18], radius=12)
    _, inner = blob_volume((40, 44, 36), centre=[16, 22, 18], radius=5)
    image = image + 0.5 * inner
    return image.astype(np.float32), (outer + inner).astype(np.int16)


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def test_register_maps_back_to_fixed_grid_with_foreign_affines(tmp_path, model_path):
    image, labels = _anatomy()
    fixed_affine = np.diag([1.5, 1.5, 1.5, 1.0])
    fixed_affine[:3, 3] = [-30, -33, -27]
    # the moving image: the same anatomy stored flipped in x and with axes y/z swapped (LPS-like)
    moving_data = np.flip(image, 0).transpose(0, 2, 1)
    moving_labels = np.flip(labels, 0).transpose(0, 2, 1)
    moving_affine = np.zeros((4, 4))
    moving_affine[0, 0] = -1.5
    moving_affine[1, 2] = 1.5
    moving_affine[2, 1] = 1.5
    moving_affine[:3, 3] = [-30 + 1.5 * 39, -33, -27]
    moving_affine[3, 3] = 1
    fixed = _write(tmp_path / "fixed.nii.gz", image, fixed_affine)
    moving = _write(tmp_path / "moving.nii.gz", np.ascontiguousarray(moving_data), moving_affine)
    mlab = _write(tmp_path / "moving_labels.nii.gz", np.ascontiguousarray(moving_labels), moving_affine)
    out = {k: str(tmp_path / f"{k}.nii.gz") for k in ("warped", "field", "wlabels")}
    rc = register_main(["--model", str(model_path), "--moving", moving, "--fixed", fixed, "--warped", out["warped"],
                        "--field", out["field"], "--moving-labels", mlab, "--warped-labels", out["wlabels"], "--threads", "1",
                        "--refine-steps", "0"])  # the network alone: its identity start shows the axes
    assert rc == 0
    warped, field, wlab = (nib.load(out[k]) for k in ("warped", "field", "wlabels"))
    for img in (warped, field, wlab):
        np.testing.assert_allclose(img.affine, fixed_affine)
    assert warped.shape == image.shape and field.shape == (*image.shape, 1, 3)  # ITK's layout (mm, LPS)
    # the untrained model starts at identity, so the same anatomy comes back onto the fixed grid
    assert np.abs(np.asarray(warped.dataobj) - image).mean() < 0.02
    assert mean_dice(np.asarray(wlab.dataobj).astype(np.int32), labels.astype(np.int32)) > 0.95
    assert np.abs(np.asarray(field.dataobj)).max() < 0.5 * 1.5  # mm


def test_register_bad_input_exits_with_one_line(tmp_path, model_path, capsys):
    image, _ = _anatomy()
    fixed = _write(tmp_path / "f.nii.gz", image, np.eye(4))
    nan = image.copy()
    nan[0, 0, 0] = np.nan
    bad = _write(tmp_path / "nan.nii.gz", nan, np.eye(4))
    assert register_main(["--model", str(model_path), "--moving", bad, "--fixed", fixed, "--warped", str(tmp_path / "w.nii.gz")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nan.nii.gz" in err and "NaN" in err
    assert not (tmp_path / "w.nii.gz").exists()
    not_model = tmp_path / "x.pt"
    torch.save({"weights": 1}, not_model)
    assert register_main(["--model", str(not_model), "--moving", fixed, "--fixed", fixed, "--warped", str(tmp_path / "w.nii.gz")]) == 1
    assert "not an ldreg model" in capsys.readouterr().err
    assert register_main(["--model", str(tmp_path / "missing.pt"), "--moving", fixed, "--fixed", fixed, "--warped", "w.nii.gz"]) == 1


def test_info_reports_architecture_and_flops(model_path, capsys):
    assert main(["info", str(model_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"]["kind"] == "student" and info["parameters"] > 0 and info["gflops_per_pair"] > 0
    assert info["preprocessing"]["grid"] == [32, 32, 32]


def _perturbed_model(model_path, tmp_path):
    model, prep, _ = load_model(model_path)
    for stage in model.stages:  # a non-zero field, so the comparison means something
        torch.nn.init.normal_(stage.flow.weight, std=0.05)
    path = tmp_path / "perturbed.pt"
    save_model(path, model, prep, {}, "perturbed")
    return path, model


def test_torchscript_export_gives_the_same_field(tmp_path, model_path):
    path, model = _perturbed_model(model_path, tmp_path)
    assert main(["export", str(path), "--format", "torchscript", "--output", str(tmp_path / "m.ts")]) == 0
    scripted = torch.jit.load(str(tmp_path / "m.ts"))
    x, y = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        ref = model(x, y)["flow"]
        assert ref.abs().max() > 0.05
        torch.testing.assert_close(scripted(x, y), ref, atol=1e-4, rtol=1e-4)


def test_onnx_export_gives_the_same_field(tmp_path, model_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the [test] extra")
    path, model = _perturbed_model(model_path, tmp_path)
    export_model(path, tmp_path / "m.onnx", "onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x, y = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    (flow,) = session.run(None, {"moving": x.numpy(), "fixed": y.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(flow, model(x, y)["flow"].numpy(), atol=1e-4)
