"""The research scripts under experiments/: their sweep files are checked before anything trains."""
import importlib.util
from pathlib import Path

import pytest
import yaml

from ldreg.io import InputError

ROOT = Path(__file__).resolve().parents[1]


def _student_sweep():
    spec = importlib.util.spec_from_file_location("student_sweep", ROOT / "experiments" / "student_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted((ROOT / "experiments" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_sweep_in_the_repository_is_valid(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # a sweep's base is relative to where it runs: the repository root
    sweep, config = _student_sweep().load_sweep(path)
    assert sweep["variants"] and "students" in config


def _write(tmp_path, sweep: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_a_sweep_with_a_misspelt_key_is_refused_naming_the_variant_and_key(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    load_sweep = _student_sweep().load_sweep
    good = {"base": "config.yaml", "steps": 10, "validate_every": 5,
            "variants": {"fast": {"train": {"lr": 1e-3}}, "plain": None}}
    assert set(load_sweep(_write(tmp_path, good))[0]["variants"]) == {"fast", "plain"}
    typo = {**good, "variants": {"fast": {"train": {"lrr": 1e-3}}}}
    with pytest.raises(InputError, match=r"variant fast: students\.variants\.fast\.train: .*'lrr'"):
        load_sweep(_write(tmp_path, typo))
    with pytest.raises(InputError, match=r"not a sweep .*steps"):
        load_sweep(_write(tmp_path, {**good, "steps": 0}))
    with pytest.raises(InputError, match="base config nowhere.yaml not found"):
        load_sweep(_write(tmp_path, {**good, "base": "nowhere.yaml"}))
