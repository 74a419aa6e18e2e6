"""The run's configuration: one place for each default, and the cross-key checks the schema
cannot express (ldreg.config_checks)."""
import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from ldreg.config_checks import config_problems, headline_variants
from ldreg.settings import merged

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "config.yaml").read_text())
SCHEMA = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())


def _schema_defaults(schema, path=()):
    """(config path, default) of every property the schema gives a default."""
    for key, prop in (schema.get("properties") or {}).items():
        if "default" in prop:
            yield path + (key,), prop["default"]
        yield from _schema_defaults(prop, path + (key,))


def _in_config(path) -> bool:
    node = CONFIG
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def test_each_default_is_written_once():
    """config.yaml is loaded under every run (the Snakefile's configfile): a key it sets has its
    default there, and a schema default for the same key could only disagree with it."""
    both = [".".join(p) for p, _ in _schema_defaults(SCHEMA) if _in_config(p)]
    assert both == []


def test_the_default_config_is_valid_and_has_no_cross_key_problem():
    jsonschema.Draft202012Validator(SCHEMA).validate(CONFIG)
    trained = ["teacher", "peer_voxelmorph", *[f"student_{v}" for v in headline_variants(CONFIG)]]
    assert config_problems(CONFIG, trained) == []


def _trained(config):
    return ["teacher", *[f"student_{v}" for v in headline_variants(config)]]


@pytest.mark.parametrize("change, problem", [
    (lambda c: c["speed_profile"].update(models=["teacher", "student_nonexistent"]),
     r"speed_profile.models names \['student_nonexistent'\]"),
    (lambda c: c["speed_profile"].update(baseline_model="student_aldk_long", models=["teacher"],
                                         reference_model=None),
     "speed_profile.baseline_model 'student_aldk_long' must be one of"),
    (lambda c: c["speed_profile"].update(reference_engine="int8"), "speed_profile.reference_engine 'int8'"),
    (lambda c: c["students"].update(headline=["aldk_long", "switched_off"]),
     r"students.headline names \['switched_off'\]"),
    (lambda c: c["students"]["variants"].update(plain={"train": {"steps": 10}, "targets": "refined"}),
     "students.variants.plain: targets: refined, but the variant uses no teacher field"),
    (lambda c: c["teacher_cache"]["refine"].update(steps=0),
     "targets: refined needs teacher_cache.refine.steps >= 1"),
    (lambda c: c["evaluation"]["refine"].update(models=["student_gone"]),
     r"evaluation.refine.models names \['student_gone'\]"),
])
def test_a_cross_key_problem_is_named(change, problem):
    config = copy.deepcopy(CONFIG)
    change(config)
    found = config_problems(config, _trained(config))
    assert any(re.search(problem, p) for p in found), found


@pytest.mark.parametrize("overlay", sorted((ROOT / "config" / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_experiment_overlays_are_valid_runs(overlay):
    """Each overlay under config/experiments, over config.yaml as its comment runs it, is a config
    the schema and the cross-key checks accept (a misspelt key fails here, not an hour in)."""
    config = merged(CONFIG, yaml.safe_load(overlay.read_text()))
    jsonschema.validate(config, SCHEMA)
    # the models `all` trains, as the Snakefile lists them (common.smk: method_sets)
    trained = ["teacher", *[f"student_{v}" for v in headline_variants(config)]]
    trained += ["peer_voxelmorph"] if config["peers"]["voxelmorph"]["enabled"] else []
    assert config_problems(config, trained) == []
