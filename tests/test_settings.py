"""The validated config as typed objects (ldreg.settings): built once per job, every value from
config.yaml or the schema, a missing key named."""
import copy

import pytest
import yaml
from snakemake.exceptions import WorkflowError

from ldreg import peers
from ldreg.defaults import REFINE_SPACINGS
from ldreg.methods import parse_refine_steps
from ldreg.settings import CONFIG_FILE, ConfigKeyError, RunSettings, load_config

CONFIG = yaml.safe_load(CONFIG_FILE.read_text())


def test_the_default_config_becomes_typed_settings():
    settings = RunSettings.from_config(load_config())
    assert settings.grid == tuple(CONFIG["preprocessing"]["grid"])
    assert settings.spacing_mm == CONFIG["preprocessing"]["spacing_mm"]
    assert settings.data.synthetic.subjects == CONFIG["data"]["synthetic"]["subjects"]
    assert settings.pairs.max_test == CONFIG["pairs"]["max_test"]
    assert settings.batch.suffix == CONFIG["batch"]["suffix"]
    assert settings.speed_profile.reference_model == CONFIG["speed_profile"]["reference_model"]
    assert settings.greedy["fast"] == peers.GreedySetting(CONFIG["peers"]["greedy"]["settings"]["fast"]["iterations"])
    # config.yaml leaves these to the schema's defaults: register's levels, the crop's margin
    assert CONFIG["evaluation"]["refine"].get("spacings") is None and settings.evaluation.refine.spacings == REFINE_SPACINGS
    assert "margin_vox" not in CONFIG["real_anatomy"] and settings.real_anatomy.margin_vox == 4
    assert settings.evaluation.refine.with_spacings == tuple(
        (parse_refine_steps(s["steps"]), tuple(s["spacings"])) for s in CONFIG["evaluation"]["refine"]["with_spacings"])


def test_the_run_seed_reaches_every_generator():
    settings = RunSettings.from_config(load_config({"seed": 5}))
    assert settings.seed == settings.data.synthetic.seed == settings.real_anatomy.seed == 5


def test_an_overlay_changes_only_its_keys():
    settings = RunSettings.from_config(load_config({"batch": {"qc": False}, "evaluation": {"refine": {"lr": 0.5}}}))
    assert settings.batch.qc is False and settings.batch.pattern == CONFIG["batch"]["pattern"]
    assert settings.evaluation.refine.optimiser == {"lr": 0.5}
    assert settings.evaluation.refine.models == tuple(CONFIG["evaluation"]["refine"]["models"])


def test_refinement_steps_per_level_are_read_and_checked():
    settings = RunSettings.from_config(load_config({"batch": {"refine_steps": "10x10x2"}, "evaluation": {"refine": {
        "with_spacings": [{"steps": "10x10x2", "spacings": [4, 3, 2]}, {"steps": 12, "spacings": [4, 3]}]}}}))
    assert settings.batch.refine_steps == (10, 10, 2)
    assert settings.evaluation.refine.with_spacings == (((10, 10, 2), (4, 3, 2)), (12, (4, 3)))
    with pytest.raises(ConfigKeyError, match="10x2 gives 2 levels' iterations for 3 spacings"):
        RunSettings.from_config(load_config({"evaluation": {"refine": {
            "with_spacings": [{"steps": "10x2", "spacings": [4, 3, 2]}]}}}))
    with pytest.raises(WorkflowError, match="10y"):
        load_config({"batch": {"refine_steps": "10y"}})


def test_a_missing_key_is_named():
    config = load_config()
    broken = copy.deepcopy(config)
    del broken["batch"]["qc"]
    with pytest.raises(ConfigKeyError, match="'batch.qc'"):
        RunSettings.from_config(broken)
    del broken["batch"]
    with pytest.raises(ConfigKeyError, match="'batch'.*schema"):
        RunSettings.from_config(broken)


def test_an_unknown_key_fails_validation():
    with pytest.raises(WorkflowError, match="refine_stpes"):
        load_config({"batch": {"refine_stpes": 3}})


def test_greedy_switched_off_has_no_settings():
    settings = RunSettings.from_config(load_config({"peers": {"greedy": {"enabled": False}}}))
    assert settings.greedy == {}
    with pytest.raises(ValueError, match="peer_greedy_fast.*enabled is false"):
        peers.greedy_setting(settings.greedy, "fast")


@pytest.mark.parametrize("section", ["synthetic", "real_anatomy", "preprocessing"])
def test_library_defaults_agree_with_the_run(section):
    """The data classes' own defaults (for use without a config) are the default run's values:
    a change to config.yaml or the schema that leaves them behind fails here."""
    from ldreg.data import SyntheticConfig
    from ldreg.preprocessing import Preprocessing
    from ldreg.real_anatomy import RealAnatomyConfig

    settings = RunSettings.from_config(load_config())
    run, library = {"synthetic": (settings.data.synthetic, SyntheticConfig()),
                    "real_anatomy": (settings.real_anatomy, RealAnatomyConfig()),
                    "preprocessing": (settings.preprocessing, Preprocessing())}[section]
    assert run == library
