"""Accuracy at the scan's own resolution (ldreg.native), the real-anatomy pairs
(ldreg.real_anatomy) and method names (ldreg.methods)."""
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import blob_volume
from ldreg.preprocessing import Preprocessing
from ldreg.io import InputError, field_to_itk_array, itk_array_to_field
from ldreg.methods import Method, format_refine_steps, parse_method, parse_refine_steps, refined_method
from ldreg.modelfile import save_model
from ldreg.native import NativeOutput, evaluate_native, native_accuracy_table, native_runner, pareto_front
from ldreg.networks import CascadeSpec, build_network
from ldreg.real_anatomy import RealAnatomyConfig, check_sources, make_real_anatomy_pairs


def test_method_names_parse_into_values():
    assert parse_method("identity") == Method("identity", "identity")
    assert parse_method("affine") == Method("affine", "affine", model="teacher")
    assert parse_method("student_aldk_long+refine20") == Method("student_aldk_long+refine20", "refine",
                                                                model="student_aldk_long", steps=20)
    # a setting with its own levels: named by them, and the name read back into them
    assert refined_method("student_aldk_long", 12, [4, 3]) == "student_aldk_long+refine12_4-3mm"
    assert parse_method("s+refine30_4-2-1.5mm") == Method("s+refine30_4-2-1.5mm", "refine", model="s", steps=30,
                                                           spacings=(4.0, 2.0, 1.5))
    assert parse_method("s+refine30").spacings is None
    # each level's own iterations (Greedy's -n syntax), read back as a tuple
    assert refined_method("s", "10x10x2", [4, 3, 2]) == "s+refine10x10x2_4-3-2mm"
    assert parse_method("s+refine10x10x2_4-3-2mm").steps == (10, 10, 2)
    assert parse_method("s+refine10x0").steps == (10, 0) and parse_method("s+refine10x0").model == "s"
    assert parse_refine_steps("12") == 12 and parse_refine_steps(7) == 7 and format_refine_steps((8, 4, 1)) == "8x4x1"
    for bad in ("10x", "x2", "1.5", "-3", -3, True, (4,)):
        with pytest.raises(ValueError, match="refinement steps"):
            parse_refine_steps(bad)
    assert parse_method("optimise10").steps == 10 and parse_method("optimise10").optimises
    assert parse_method("peer_greedy_fast") == Method("peer_greedy_fast", "greedy", setting="fast")
    assert parse_method("peer_ants_syn").peer and not parse_method("teacher").peer
    assert parse_method("peer_voxelmorph") == Method("peer_voxelmorph", "model", model="peer_voxelmorph")
    with pytest.raises(ValueError, match="not a method"):
        parse_method("teacher refine")


def test_itk_field_conversion_inverts_the_written_one():
    rng = np.random.default_rng(0)
    field = rng.normal(size=(3, 5, 6, 7)).astype(np.float32)
    affine = np.array([[0, 0, -1.5, 10], [1.2, 0, 0, -3], [0, 2.0, 0, 4], [0, 0, 0, 1]])
    back = itk_array_to_field(field_to_itk_array(field, affine), affine)
    np.testing.assert_allclose(back, field, atol=1e-5)
    with pytest.raises(InputError, match="displacement field"):
        itk_array_to_field(np.zeros((4, 4, 4, 2)), affine)


def test_pareto_front_keeps_only_the_unbeaten():
    seconds = [1.0, 2.0, 0.5, 3.0, 2.5]
    dice = [0.80, 0.85, 0.70, 0.84, 0.90]
    # 3.0 s / 0.84 is beaten by 2.0 s / 0.85
    assert list(pareto_front(seconds, dice)) == [2, 0, 1, 4]


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


@pytest.fixture()
def shifted_pair(tmp_path):
    """A two-structure blob at 1.5 mm, the moving copy 4 voxels (6 mm) before the fixed along x."""
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    shape = (40, 40, 40)
    files = {}
    for name, x in (("moving", 16), ("fixed", 20)):
        image, outer = blob_volume(shape, centre=[x, 20, 20], radius=10)
        _, inner = blob_volume(shape, centre=[x - 4, 20, 20], radius=4)
        files[name] = _write(tmp_path / f"{name}.nii", (image + 0.5 * inner).astype(np.float32), affine)
        files[f"{name}_labels"] = _write(tmp_path / f"{name}_labels.nii", (outer + inner).astype(np.int16), affine)
    return pd.DataFrame([{"pair_id": "p1", **files}])


def _shift_runner(shift_vox):
    """An oracle: the moving labels moved by the known shift, the constant field that does it."""
    def run(moving, fixed, moving_labels, out_dir):
        labels = np.asarray(nib.load(moving_labels).dataobj).astype(np.int32)
        moved = np.roll(labels, shift_vox, axis=0)
        field = np.zeros((3, *labels.shape), np.float32)
        field[0] = -shift_vox
        return NativeOutput(moved, field, {"network": 0.01})
    return run


def test_native_scoring_of_a_known_shift(shifted_pair):
    identity, _ = evaluate_native("identity", native_runner(parse_method("identity")), shifted_pair,
                                  show_progress=False)
    oracle, per_label = evaluate_native("oracle", _shift_runner(4), shifted_pair, show_progress=False)
    half, _ = evaluate_native("half", _shift_runner(2), shifted_pair, show_progress=False)
    assert oracle.dice.iloc[0] == pytest.approx(1.0) and oracle.hd95_mm.iloc[0] == pytest.approx(0.0)
    assert identity.dice.iloc[0] < half.dice.iloc[0] < 1.0
    # HD95 in mm at the fixed image's spacing: a 2-voxel miss is 3 mm at 1.5 mm voxels
    assert half.hd95_mm.iloc[0] == pytest.approx(3.0, abs=0.1)
    assert oracle.folding_fraction.iloc[0] == 0 and oracle.sdlogj.iloc[0] == pytest.approx(0, abs=1e-6)
    assert set(per_label.label) == {1, 2}
    assert np.isnan(identity.seconds.iloc[0]) and oracle.seconds.iloc[0] > 0
    table = native_accuracy_table(pd.concat([identity, oracle, half]))
    gain = table.set_index("method")["dice_gain"]
    assert gain["oracle"] == pytest.approx(1.0 - identity.dice.iloc[0]) and gain["half"] < gain["oracle"]
    assert table.set_index("method").loc["identity", "flag"] == ""


def test_pairs_scored_side_by_side_match_one_at_a_time_and_registration_stays_alone(shifted_pair):
    four = pd.concat([shifted_pair.assign(pair_id=f"p{i}") for i in range(4)], ignore_index=True)
    running, overlaps = [], []

    def runner(moving, fixed, moving_labels, out_dir):
        running.append(1)
        overlaps.append(len(running))
        out = _shift_runner(1 + len(overlaps) % 3)(moving, fixed, moving_labels, out_dir)
        running.pop()
        return out

    serial, serial_labels = evaluate_native("m", runner, four, show_progress=False, scoring_workers=1)
    overlaps.clear()
    parallel, parallel_labels = evaluate_native("m", runner, four, show_progress=False, scoring_workers=3)
    assert max(overlaps) == 1  # the timed part never shares the CPU with another pair
    assert list(parallel.pair_id) == ["p0", "p1", "p2", "p3"]
    pd.testing.assert_frame_equal(serial.drop(columns="seconds"), parallel.drop(columns="seconds"))
    pd.testing.assert_frame_equal(serial_labels, parallel_labels)
    assert serial.dice.nunique() == 3  # the shifts differ, so an order mix-up would show


def test_network_path_at_native_resolution_maps_the_field_to_the_fixed_grid(tmp_path, shifted_pair):
    path = tmp_path / "student.pt"
    model = build_network(CascadeSpec(kind="student", width=4, depth=3, affine=True, affine_width=4))
    save_model(path, model, Preprocessing(spacing_mm=3.0, grid=(24, 24, 24)), {"config": {"steps": 0}}, "student")
    for name in ("student", "affine", "student+refine3", "student+refine3_3mm"):
        per_pair, _ = evaluate_native(name, native_runner(parse_method(name), path), shifted_pair,
                                      show_progress=False)
        row = per_pair.iloc[0]
        assert row["shape"] == "40x40x40" and row.spacing_mm == 1.5
        assert row.seconds > 0 and {"preprocess_s", "network_s", "warp_s", "write_s"} <= set(per_pair.columns)
        assert 0 < row.dice <= 1
        # each refinement level's own stage time (register's default spacings, else the method's own)
        assert [c for c in per_pair if c.startswith("refine_")] == {
            "student+refine3": ["refine_4mm_s", "refine_3mm_s", "refine_2mm_s"], "student+refine3_3mm": ["refine_3mm_s"]
        }.get(name, [])
    with pytest.raises(ValueError, match="no native-resolution path"):
        native_runner(parse_method("optimise10"))


def test_native_identity_places_labels_by_world_coordinates(tmp_path):
    labels = np.zeros((10, 10, 10), np.int16)
    labels[2:4, 5, 5] = 1
    fixed_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    moving_affine = fixed_affine.copy()
    moving_affine[0, 3] = 2.0  # the moving grid starts 2 mm further along x
    moving_labels = _write(tmp_path / "ml.nii", labels, moving_affine)
    fixed = _write(tmp_path / "f.nii", np.zeros((10, 10, 10), np.float32), fixed_affine)
    out = native_runner(parse_method("identity"))(None, fixed, moving_labels, tmp_path)
    assert np.argwhere(out.warped_labels == 1)[:, 0].tolist() == [4, 5]


def test_real_anatomy_fails_clearly_without_its_package(tmp_path):
    with pytest.raises(InputError, match="mricron-data"):
        check_sources(tmp_path / "ch2bet.nii.gz", tmp_path / "aal.nii.gz")


def test_real_anatomy_pairs_move_the_scan_and_its_labels_together(tmp_path):
    image, outer = blob_volume((30, 34, 28), centre=[15, 17, 14], radius=9)
    _, inner = blob_volume((30, 34, 28), centre=[12, 17, 14], radius=4)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    src = {"image": _write(tmp_path / "t1.nii.gz", 100 * (image + 0.5 * inner), affine),
           "labels": _write(tmp_path / "lab.nii.gz", (outer + inner).astype(np.uint8), affine)}
    cfg = RealAnatomyConfig(image=src["image"], labels=src["labels"], pairs=2, deformation_mm=3.0, smoothness_mm=12.0)
    manifest = make_real_anatomy_pairs(cfg, tmp_path / "real")
    assert len(manifest) == 2 and manifest.labels.tolist() == [2, 2]
    fixed = nib.load(manifest.fixed.iloc[0])
    shape = fixed.shape
    assert all((s - 1) % cfg.coarse_factor == 0 for s in shape)  # the coarse map's corners on voxels
    again = make_real_anatomy_pairs(cfg, tmp_path / "again")  # seeded
    for a, b in zip(manifest.moving, again.moving):
        np.testing.assert_array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())
    for row in manifest.itertuples():
        moving, moving_labels = nib.load(row.moving), nib.load(row.moving_labels)
        assert moving.shape == shape and np.allclose(moving.affine, fixed.affine)
        assert row.true_displacement_max_mm > 0
        # the image's bright structure moved with its label
        inner_mask = np.asarray(moving_labels.dataobj) == 2
        assert moving.get_fdata()[inner_mask].mean() > moving.get_fdata()[np.asarray(moving_labels.dataobj) == 1].mean()
    assert not np.array_equal(nib.load(manifest.moving.iloc[0]).get_fdata(), nib.load(manifest.moving.iloc[1]).get_fdata())
    coarse = make_real_anatomy_pairs(RealAnatomyConfig(image=src["image"], labels=src["labels"], pairs=1,
                                                       spacing_mm=4.0), tmp_path / "coarse")
    assert nib.load(coarse.fixed.iloc[0]).header.get_zooms()[:3] == (4.0, 4.0, 4.0)


def test_docs_blocks_are_rendered_from_the_tables_between_markers(tmp_path):
    from ldreg.docs import native_block, update_markdown

    table = native_accuracy_table(pd.DataFrame([
        {"method": "identity", "pair_id": "p", "dice": 0.5, "seconds": np.nan, "threads": 2, "shape": "4x4x4",
         "spacing_mm": 1.0, "folding_fraction": 0.0, "sdlogj": 0.0, "hd95_mm": 3.0},
        {"method": "peer_greedy_fast", "pair_id": "p", "dice": 0.9, "seconds": 7.5, "threads": 2, "shape": "4x4x4",
         "spacing_mm": 1.0, "folding_fraction": 0.0, "sdlogj": 0.1, "hd95_mm": 1.0}]))
    block = native_block(table)
    assert block.splitlines()[2].startswith("| peer_greedy_fast | 0.900 ± 0.000 | 0.400 |")  # best first
    doc = tmp_path / "README.md"
    doc.write_text("intro\n<!-- begin generated: real -->\nold numbers\n<!-- end generated: real -->\n"
                   "<!-- begin generated: speed -->\nkept\n<!-- end generated: speed -->\n")
    assert update_markdown(doc, {"real": block}) == ["real"]
    text = doc.read_text()
    assert "old numbers" not in text and "peer_greedy_fast" in text and "kept" in text
    assert update_markdown(doc, {"real": block}) == ["real"] and doc.read_text() == text  # idempotent


def test_targets_are_read_off_the_tables_with_their_distance():
    from ldreg.docs import targets_block

    def table(rows):
        return pd.DataFrame([{"method": m, "dice_mean": d, "seconds": s, "flag": ""} for m, d, s in rows])

    real = table([("identity", 0.57, np.nan), ("student_aldk_long", 0.74, 0.8), ("student_aldk_long+refine10", 0.911, 1.6),
                  ("student_aldk_long+refine20", 0.927, 2.7), ("peer_greedy_fast", 0.910, 4.1)])
    lines = targets_block(real).splitlines()
    assert "+0.170" in lines[2] and lines[2].endswith("| met |")
    # level with Greedy fast at 1.6 s of its 4.1: 0.39 of its time, 0.23 s over a third
    assert "student_aldk_long+refine10 0.911 in 1.60 s (0.39 of Greedy's time)" in lines[3]
    assert "missed: 0.23 s too slow" in lines[3]
    assert "student_aldk_long+refine20 0.927" in lines[4] and "missed by 0.023 Dice" in lines[4]
    native = table([("identity", 0.22, np.nan), ("student_aldk_long+refine5", 0.60, 0.5), ("peer_greedy_fast", 0.56, 1.8),
                    ("peer_ants_syn", 0.47, 17.0)])
    last = targets_block(real, native).splitlines()[-1]
    assert "student_aldk_long+refine5 0.600 in 0.50 s" in last and last.endswith("| met |")
