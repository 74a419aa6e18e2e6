import hashlib
import tarfile

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from ldreg import pipeline
from ldreg.settings import load_config
from ldreg.preprocessing import Preprocessing
from ldreg.data import (SyntheticConfig, download, folder_subjects, make_pairs, make_synthetic_cohort,
                        preprocess_cohort, preprocess_image, split_subjects, true_pair_field, unpack)
from ldreg.io import InputError, load_volume
from ldreg.metrics import mean_dice
from ldreg.warp import warp_labels

SMALL = dict(subjects=4, spacing_mm=6.0, deformation_mm=5.0, smoothness_mm=20.0)
PREP = Preprocessing(spacing_mm=6.0, grid=(24, 32, 24))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    raw = make_synthetic_cohort(root / "raw", SyntheticConfig(seed=3, **SMALL))
    subjects, pairs = preprocess_cohort(raw, root / "pre", PREP, {"val": 0, "test": 0.5}, 3, 6, "all_pairs", None)
    return root, raw, subjects, pairs


def test_synthetic_cohort_is_seeded_and_reproducible(cohort, tmp_path):
    root, raw, _, _ = cohort
    again = make_synthetic_cohort(tmp_path, SyntheticConfig(seed=3, subjects=1, **{k: v for k, v in SMALL.items() if k != "subjects"}))
    a = np.asarray(nib.load(raw.image[0]).dataobj)
    b = np.asarray(nib.load(again.image[0]).dataobj)
    np.testing.assert_array_equal(a, b)
    other = np.asarray(nib.load(raw.image[1]).dataobj)
    assert np.abs(a - other).mean() > 0.01  # subjects differ


def test_true_field_registers_the_pair_better_than_identity(cohort):
    _, _, subjects, pairs = cohort
    s = subjects.set_index("id")
    pair = pairs.iloc[0]
    mov, fix = s.loc[pair.moving], s.loc[pair.fixed]
    mi, fi = nib.load(mov.labels), nib.load(fix.labels)
    truth = true_pair_field(fi.affine, fi.shape, mi.affine, nib.load(fix.true_forward), nib.load(mov.true_inverse))
    ml, fl = np.asarray(mi.dataobj).astype(np.int32), np.asarray(fi.dataobj).astype(np.int32)
    warped = warp_labels(torch.from_numpy(ml)[None, None], torch.from_numpy(truth)[None])[0, 0].numpy()
    assert mean_dice(warped, fl) > mean_dice(ml, fl) + 0.1


def test_preprocessing_gives_grid_spacing_and_range(cohort):
    _, _, subjects, _ = cohort
    img = nib.load(subjects.image[0])
    data = np.asarray(img.dataobj)
    assert data.shape == PREP.grid and np.allclose(np.diag(img.affine)[:3], PREP.spacing_mm)
    assert 0 <= data.min() and data.max() <= 1 and data.max() > 0.9
    assert set(subjects.split) == {"train", "test"}


def test_pairs_are_ordered_distinct_and_split(cohort):
    _, _, subjects, pairs = cohort
    assert (pairs.moving != pairs.fixed).all()
    split = subjects.set_index("id").split
    for row in pairs.itertuples():
        assert split[row.moving] == split[row.fixed] == row.split
    atlas = make_pairs(subjects, 3, "atlas", None, 0)
    test = atlas[atlas.split == "test"]
    assert test.moving.nunique() == 1


def test_too_few_subjects_for_splits():
    with pytest.raises(InputError, match="too few subjects"):
        split_subjects(["a", "b", "c"], {"val": 0, "test": 0.5}, 0)


# --------------------------------------------------------------------------- bad input files


def _save(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_unreadable_and_truncated_files_name_the_file(tmp_path):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti")
    with pytest.raises(InputError, match="junk.nii.gz: not a readable NIfTI"):
        load_volume(junk)
    good = _save(tmp_path / "good.nii.gz", np.random.rand(20, 20, 20).astype(np.float32))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(InputError, match="truncated.nii.gz"):
        load_volume(truncated)


def test_4d_nan_and_empty_labels(tmp_path):
    with pytest.raises(InputError, match="4d.nii.gz: expected a 3D image"):
        load_volume(_save(tmp_path / "4d.nii.gz", np.zeros((4, 4, 4, 2), np.float32)))
    nan = np.ones((4, 4, 4), np.float32)
    nan[1, 1, 1] = np.nan
    with pytest.raises(InputError, match="nan.nii.gz: 1 NaN or Inf"):
        load_volume(_save(tmp_path / "nan.nii.gz", nan))
    with pytest.raises(InputError, match="empty.nii.gz: label map is empty"):
        load_volume(_save(tmp_path / "empty.nii.gz", np.zeros((4, 4, 4), np.int16)), "labels")


def test_labels_on_another_grid_are_refused(tmp_path):
    image = _save(tmp_path / "img.nii.gz", np.random.rand(20, 20, 20).astype(np.float32))
    labels = _save(tmp_path / "lab.nii.gz", np.ones((20, 20, 20), np.int16), np.diag([2, 2, 2, 1]))
    with pytest.raises(InputError, match="lab.nii.gz: affine"):
        preprocess_image(image, PREP, labels)


def test_failed_preprocessing_leaves_no_manifest(tmp_path, cohort):
    _, raw, _, _ = cohort
    bad = raw.copy()
    bad.loc[0, "image"] = str(tmp_path / "missing.nii.gz")
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    bad.to_csv(raw_dir / "subjects.csv", index=False)
    config = load_config({"preprocessing": PREP.to_dict(), "splits": {"val": 0, "test": 0.5},
                          "pairs": {"train": 4, "test_mode": "all_pairs", "max_test": None}})
    with pytest.raises(InputError, match="missing.nii.gz: file not found"):
        pipeline.preprocess(config, raw_dir, tmp_path / "pre", tmp_path / "subjects.csv", tmp_path / "pairs.csv")
    assert not (tmp_path / "subjects.csv").exists() and not (tmp_path / "pairs.csv").exists()


# ---------------------------------------------------------------------- downloads and folders


@pytest.fixture()
def archive(tmp_path):
    src = tmp_path / "src"
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    for i in range(2):
        _save(src / "imagesTr" / f"case_{i}.nii.gz", np.random.rand(8, 8, 8).astype(np.float32))
        _save(src / "labelsTr" / f"case_{i}.nii.gz", np.ones((8, 8, 8), np.int16))
    path = tmp_path / "data.tar"
    with tarfile.open(path, "w") as tf:
        tf.add(src, arcname="Task")
    return path, {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_download_verifies_unpacks_and_folder_finds_labels(tmp_path, archive):
    path, digest = archive
    dest = download(path.as_uri(), tmp_path / "dl" / "data.tar", digest)
    unpack(dest, tmp_path / "unpacked")
    subjects = folder_subjects(tmp_path / "unpacked", "Task/imagesTr/*.nii.gz", "imagesTr", "labelsTr")
    assert len(subjects) == 2 and all("labelsTr" in p for p in subjects.labels)


def test_download_resumes_a_partial_file(tmp_path, archive):
    path, digest = archive
    dest = tmp_path / "dl" / "data.tar"
    dest.parent.mkdir()
    (dest.parent / "data.tar.part").write_bytes(path.read_bytes()[:1000])
    download(path.as_uri(), dest, digest)
    assert dest.read_bytes() == path.read_bytes()


def test_download_verifies_a_published_md5(tmp_path, archive):
    path, _ = archive
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    dest = download(path.as_uri(), tmp_path / "dl.tar", {"md5": md5.upper()})
    assert dest.read_bytes() == path.read_bytes()


def test_checksum_mismatch_and_no_network_fail_clearly(tmp_path, archive):
    path, digest = archive
    (tmp_path / "other.txt").write_text("kept")
    with pytest.raises(InputError, match="checksum mismatch") as err:
        download(path.as_uri(), tmp_path / "x.tar", {"md5": "0" * 32})
    # both values named; the bad download kept aside, nothing else touched
    assert "0" * 32 in str(err.value) and hashlib.md5(path.read_bytes()).hexdigest() in str(err.value)
    assert not (tmp_path / "x.tar").exists() and not (tmp_path / "x.tar.part").exists()
    assert (tmp_path / "x.tar.mismatch").read_bytes() == path.read_bytes()
    assert (tmp_path / "other.txt").read_text() == "kept"
    with pytest.raises(ValueError, match="checksum must be"):
        download(path.as_uri(), tmp_path / "z.tar", {"crc32": "0"})
    with pytest.raises(InputError, match="download failed"):
        download("http://127.0.0.1:9/none.tar", tmp_path / "y.tar", None)


def test_folder_without_matching_labels(tmp_path):
    _save(tmp_path / "a.nii.gz", np.random.rand(8, 8, 8).astype(np.float32))
    with pytest.raises(InputError, match="label map"):
        folder_subjects(tmp_path, "*.nii.gz", r"a\.nii", "a_seg.nii")


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    import os

    from ldreg.io import write_csv

    write_csv(pd.DataFrame({"a": [1]}), tmp_path / "x.csv")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.csv").stat().st_mode & 0o777 == 0o666 & ~umask


def test_label_appearance_paints_each_structure_around_its_template_intensity():
    from ldreg.data import synthesis_classes, synthesise_from_labels
    rng = np.random.default_rng(0)
    labels = np.zeros((20, 20, 20), np.int32)
    labels[2:10, 2:18, 2:18], labels[10:18, 2:18, 2:18] = 1, 2
    template = np.where(labels == 1, 0.8, np.where(labels == 2, 0.3, 0.0)).astype(np.float32)
    template[10:18, 2:6, 2:18] = 0.5  # part of the brain no label covers
    labels[10:18, 2:6, 2:18] = 0
    classes, medians = synthesis_classes(template, labels)
    assert set(medians) >= {1, 2} and len(medians) > 2  # the unlabelled brain became classes of its own
    assert (classes[template == 0] == 0).all() and (classes[template > 0] > 0).all()
    flat = SyntheticConfig(spacing_mm=3.0, label_contrast=0.0, label_blur_mm=0.0)
    painted = synthesise_from_labels(classes, medians, flat, rng)
    for k, median in medians.items():  # no contrast change: each class at its median, +- its texture
        assert abs(painted[classes == k].mean() - median) < 0.01
        assert painted[classes == k].std() <= 0.05 * 1.1
    assert (painted[classes == 0] == 0).all()
    varied = SyntheticConfig(spacing_mm=3.0, label_contrast=0.5, label_blur_mm=0.0)
    means = [[synthesise_from_labels(classes, medians, varied, rng)[labels == k].mean() for k in (1, 2)] for _ in range(2)]
    assert np.abs(np.subtract(*means)).max() > 0.02  # two subjects, two contrasts
    blurred = synthesise_from_labels(classes, medians, SyntheticConfig(spacing_mm=3.0, label_contrast=0.0,
                                                                      label_blur_mm=6.0), np.random.default_rng(1))
    edge = (slice(8, 12), slice(8, 12), slice(8, 12))  # across the 1|2 boundary the blur smooths the step
    assert np.abs(np.diff(blurred[edge], axis=0)).max() < np.abs(np.diff(painted[edge], axis=0)).max()


def test_label_appearance_cohort_is_seeded_keeps_the_labels_and_changes_the_image(cohort, tmp_path):
    _, raw, _, _ = cohort
    one = {k: v for k, v in SMALL.items() if k != "subjects"}
    painted = make_synthetic_cohort(tmp_path / "a", SyntheticConfig(seed=3, subjects=1, appearance="labels", **one))
    again = make_synthetic_cohort(tmp_path / "b", SyntheticConfig(seed=3, subjects=1, appearance="labels", **one))
    image = lambda path: np.asarray(nib.load(path).dataobj)
    np.testing.assert_array_equal(image(painted.image[0]), image(again.image[0]))
    # the same deformation draws: the labels are the template cohort's, the image is not
    np.testing.assert_array_equal(image(painted.labels[0]), image(raw.labels[0]))
    assert np.abs(image(painted.image[0]) - image(raw.image[0])).mean() > 0.01
    with pytest.raises(InputError, match="appearance"):
        make_synthetic_cohort(tmp_path / "c", SyntheticConfig(seed=3, subjects=1, appearance="painted", **one))
