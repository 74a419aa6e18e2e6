"""register-batch: many pairs in one process, resume, bad input reported, QC pictures."""
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import blob_volume
from ldreg.batch import BatchOptions, batch_pairs, pairs_from_csv, pairs_from_folder, register_batch
from ldreg.cli import main
from ldreg.io import InputError
from ldreg.register import Registrar

AFFINE = np.diag([1.5, 1.5, 1.5, 1.0])


def _save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture()
def cohort(tmp_path):
    """A fixed blob with two labels and three moving copies shifted by 0-2 voxels (1.5 mm grid)."""
    rows = []
    for k, shift in enumerate([0, 1, 2]):
        image, outer = blob_volume((40, 44, 36), centre=[20 + shift, 22, 18], radius=12)
        _, inner = blob_volume((40, 44, 36), centre=[16 + shift, 22, 18], radius=5)
        name = "fixed" if k == 0 else f"moving{k}"
        _save(tmp_path / f"{name}.nii.gz", (image + 0.5 * inner).astype(np.float32))
        _save(tmp_path / f"{name}_labels.nii.gz", (outer + inner).astype(np.int16))
        if k:
            rows.append({"moving": f"{name}.nii.gz", "fixed": "fixed.nii.gz", "moving_labels": f"{name}_labels.nii.gz",
                         "fixed_labels": "fixed_labels.nii.gz"})
    pd.DataFrame(rows).to_csv(tmp_path / "pairs.csv", index=False)
    return tmp_path


def test_a_batch_registers_every_pair_scores_it_and_writes_pictures(tmp_path, cohort, model_path):
    registrar = Registrar(model_path, refine_levels=((4.0, 2),))
    out = tmp_path / "out"
    summary = register_batch(registrar, pairs_from_csv(cohort / "pairs.csv"), out, BatchOptions(qc=True),
                             show_progress=False)
    assert list(summary.status) == ["ok", "ok"] and list(summary.pair_id) == ["moving1", "moving2"]
    assert (summary.dice > 0.5).all() and (summary.folding_percent < 1).all()
    for pair in ("moving1", "moving2"):
        warped = nib.load(out / pair / "warped.nii.gz")
        assert warped.shape == (40, 44, 36) and np.allclose(warped.affine, AFFINE)
        assert nib.load(out / pair / "field.nii.gz").shape == (40, 44, 36, 1, 3)
        record = json.loads((out / pair / "result.json").read_text())
        assert record["status"] == "ok" and record["dice"] == pytest.approx(summary.set_index("pair_id").dice[pair])
        assert (out / pair / "qc.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "report.md").read_text()
    assert "moving1/qc.png" in page and "moving2/qc.png" in page
    assert pd.read_csv(out / "summary.csv").shape[0] == 2


def test_a_batch_resumes_skipping_complete_pairs_and_redoing_half_written_ones(tmp_path, cohort, model_path):
    registrar = Registrar(model_path)
    pairs, out = pairs_from_csv(cohort / "pairs.csv"), tmp_path / "out"
    register_batch(registrar, pairs, out, show_progress=False)
    (out / "moving2" / "field.nii.gz").unlink()  # as if killed while writing moving2's files
    first = (out / "moving1" / "warped.nii.gz").stat().st_mtime_ns
    assert registrar.compiled_warp  # two pairs to register: the compiled kernels
    one_left = Registrar(model_path)
    summary = register_batch(one_left, pairs, out, show_progress=False)
    assert not one_left.compiled_warp  # one pair left: torch's passes, no kernels to load
    assert list(summary.status) == ["done before", "ok"]
    assert (out / "moving1" / "warped.nii.gz").stat().st_mtime_ns == first  # not rewritten
    assert (out / "moving2" / "field.nii.gz").exists()
    # other settings (here: a refinement) make every pair's outputs stale
    summary = register_batch(Registrar(model_path, refine_levels=((4.0, 1),)), pairs, out, show_progress=False)
    assert list(summary.status) == ["ok", "ok"]


def test_bad_inputs_are_reported_by_file_and_the_other_pairs_complete(tmp_path, cohort, model_path):
    (cohort / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    _save(cohort / "other_grid_labels.nii.gz", np.ones((20, 22, 18), np.int16))
    table = pd.read_csv(cohort / "pairs.csv")
    broken = {**table.iloc[0].to_dict(), "moving": "broken.nii.gz", "pair_id": "broken"}
    wrong_grid = {**table.iloc[1].to_dict(), "moving_labels": "other_grid_labels.nii.gz", "pair_id": "wrong_grid"}
    table = pd.concat([table.assign(pair_id=["moving1", "moving2"]), pd.DataFrame([broken, wrong_grid])])
    table.to_csv(cohort / "mixed.csv", index=False)
    out = tmp_path / "out"
    rc = main(["register-batch", "--model", str(model_path), "--pairs", str(cohort / "mixed.csv"), "--out-dir", str(out),
               "--threads", "1", "--refine-steps", "0"])
    assert rc == 1  # some pairs failed: the exit status says so
    summary = pd.read_csv(out / "summary.csv").set_index("pair_id")
    assert summary.status.to_dict() == {"moving1": "ok", "moving2": "ok", "broken": "error", "wrong_grid": "error"}
    assert "broken.nii.gz" in summary.error["broken"] and "readable" in summary.error["broken"]
    assert "other_grid_labels.nii.gz" in summary.error["wrong_grid"] and "grid" in summary.error["wrong_grid"]
    assert not (out / "broken").exists() or not (out / "broken" / "result.json").exists()


def test_a_folder_of_scans_is_registered_to_one_template(tmp_path, cohort, model_path):
    moving_dir = tmp_path / "scans"
    moving_dir.mkdir()
    for name in ("moving1", "moving2"):
        (moving_dir / f"{name}.nii.gz").write_bytes((cohort / f"{name}.nii.gz").read_bytes())
    (moving_dir / "notes.txt").write_text("not a scan")
    pairs = pairs_from_folder(moving_dir, cohort / "fixed.nii.gz")
    assert [p.pair_id for p in pairs] == ["moving1", "moving2"]
    summary = register_batch(Registrar(model_path), pairs, tmp_path / "out", BatchOptions(suffix=".nii"),
                             show_progress=False)
    assert list(summary.status) == ["ok", "ok"] and "dice" not in summary  # no labels: no Dice
    assert (tmp_path / "out" / "moving1" / "warped.nii").exists()


def test_pairs_files_with_problems_are_refused_clearly(tmp_path):
    (tmp_path / "a.csv").write_text("moving,target\nx.nii,y.nii\n")
    with pytest.raises(InputError, match="a.csv.*'moving' and 'fixed'"):
        pairs_from_csv(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("moving,fixed\nx.nii,y.nii\nx.nii,z.nii\n")
    with pytest.raises(InputError, match="appears twice"):
        pairs_from_csv(tmp_path / "b.csv")
    with pytest.raises(InputError, match="no NIfTI file"):
        pairs_from_folder(tmp_path, tmp_path / "y.nii")
    with pytest.raises(InputError, match="either a CSV of pairs or a folder"):
        batch_pairs(tmp_path / "a.csv", tmp_path)
    with pytest.raises(InputError, match="needs the fixed image"):
        batch_pairs(moving_dir=tmp_path)


def test_help_answers_without_importing_torch():
    code = ("import sys; from ldreg.cli import main\n"
            "try:\n    main(['register-batch', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported for --help'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
