"""The run's validated config as typed objects, built once per job (:meth:`RunSettings.from_config`).

The config a job receives has passed the schema (workflow/schemas/config.schema.yaml), which fills
in the keys config.yaml leaves out; config.yaml is the one place of every other default. So
nothing here has a default of its own: a key the config lacks is an error that names it, and the
jobs in :mod:`ldreg.pipeline` read attributes, not nested dicts. The training sections (teacher,
students, VoxelMorph) are typed by :func:`ldreg.pipeline.training_job`, one job's network and
:class:`ldreg.training.TrainConfig`."""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from pathlib import Path

from .data import SyntheticConfig
from .defaults import REFINE_SPACINGS
from .methods import check_steps_per_level, parse_refine_steps
from .peers import GreedySetting
from .preprocessing import Preprocessing
from .real_anatomy import RealAnatomyConfig


class ConfigKeyError(ValueError):
    """A key the validated config should hold is missing (a config built by hand, not validated)."""


def _section(config: dict, path: str) -> dict:
    node = config
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise ConfigKeyError(f"config: missing key {path!r} (is the config validated against "
                                 "workflow/schemas/config.schema.yaml?)")
        node = node[key]
    return node


def _typed(cls, config: dict, path: str, **extra):
    """``cls`` from the section at ``path``: every field of ``cls`` read from it (or ``extra``)."""
    section = _section(config, path)
    values = {}
    for f in fields(cls):
        if f.name in extra:
            values[f.name] = extra[f.name]
        elif f.name in section:
            values[f.name] = section[f.name]
        else:
            raise ConfigKeyError(f"config: missing key '{path}.{f.name}'")
    return cls(**values)


@dataclass(frozen=True)
class Splits:
    """``splits``: the fractions of subjects held out for validation and test."""

    val: float
    test: float

    def fractions(self) -> dict:
        return {"val": self.val, "test": self.test}


@dataclass(frozen=True)
class PairSettings:
    """``pairs``: how many training pairs, and which test pairs (``test_mode``, at most ``max_test``)."""

    train: int
    test_mode: str
    max_test: int | None


@dataclass(frozen=True)
class DataSettings:
    """Where the subjects come from: ``source`` (synthetic, folder or a download's name) and its
    section; ``max_subjects`` and ``label_map`` apply to every source."""

    source: str
    synthetic: SyntheticConfig
    folder: dict
    downloads: dict
    max_subjects: int | None
    label_map: dict | None

    def download(self) -> dict:
        """The download spec of ``source`` (url, archive, checksum, image_glob, label pattern)."""
        if self.source not in self.downloads:
            raise ConfigKeyError(f"config: data.source {self.source!r} has no entry in data.downloads")
        return self.downloads[self.source]


@dataclass(frozen=True)
class RefineSettings:
    """``evaluation.refine``: the per-pair optimisation and refinement rows of the tables."""

    optimise_steps: tuple
    models: tuple
    steps: tuple
    spacings: tuple  # register's levels (mm) at the scan's own resolution
    with_spacings: tuple  # (steps, spacings) settings scored at the scan's own resolution only
    optimiser: dict  # ldreg.optimise.optimise_field's options set in the config (the rest its defaults)


OPTIMISER_OPTIONS = ("lr", "smoothness_weight", "resolution", "coarse_fraction")


@dataclass(frozen=True)
class EvaluationSettings:
    """``evaluation``: the model-grid tables' options and the learning curves' validation pairs."""

    hd95: bool
    validation_pairs: int
    refine: RefineSettings


@dataclass(frozen=True)
class NativeSettings:
    """``native_evaluation``: scoring at the scan's own resolution through register's path."""

    enabled: bool
    models: list | None  # None: every trained model
    hd95: bool
    ants_pairs: int  # ANTs SyN on the first pairs of each cohort only (0: all)


@dataclass(frozen=True)
class BatchSettings:
    """``batch``: the register_batch target's pairs (a CSV, or a folder to one fixed image) and outputs."""

    enabled: bool
    pairs: str | None
    moving_dir: str | None
    fixed: str | None
    pattern: str
    model: str | None
    refine_steps: int | tuple | None  # as register --refine-steps (None: its default)
    qc: bool
    suffix: str

    def __post_init__(self):  # the config writes "10x10x2" for each level's iterations
        if self.refine_steps is not None:
            object.__setattr__(self, "refine_steps", parse_refine_steps(self.refine_steps))


@dataclass(frozen=True)
class TimingSettings:
    """``timing``: the speed table's forward passes."""

    extra_grids: list  # grids timed beyond the model's own
    repeats: int
    warmup: int  # runs not counted


@dataclass(frozen=True)
class SpeedProfileSettings:
    """``speed_profile``: the register path timed stage by stage (:mod:`ldreg.speed_profile`)."""

    full: bool
    models: list
    engines: list
    reference_engine: str
    baseline_model: str
    reference_model: str | None
    extra_grids: list
    native_inputs: list
    ants_repeats: int
    greedy_repeats: int
    threads: list
    repeats: int
    warmup: int


@dataclass(frozen=True)
class BenchmarkSettings:
    """``benchmark``: the core operations' timing grid and runs."""

    grid: list
    repeats: int


@dataclass(frozen=True)
class RunSettings:
    """A run's settings; the training sections are :func:`ldreg.pipeline.training_job`'s."""

    seed: int
    device: str
    preprocessing: Preprocessing
    splits: Splits
    pairs: PairSettings
    data: DataSettings
    evaluation: EvaluationSettings
    native: NativeSettings
    real_anatomy: RealAnatomyConfig
    batch: BatchSettings
    timing: TimingSettings
    speed_profile: SpeedProfileSettings
    benchmark: BenchmarkSettings
    greedy: dict  # setting name -> GreedySetting; empty when peers.greedy is switched off

    @property
    def grid(self) -> tuple:
        return tuple(self.preprocessing.grid)

    @property
    def spacing_mm(self) -> float:
        return self.preprocessing.spacing_mm

    @classmethod
    def from_config(cls, config: dict) -> "RunSettings":
        seed = _section(config, "seed")
        return cls(
            seed=seed,
            device=_section(config, "device"),
            preprocessing=Preprocessing.from_dict(_section(config, "preprocessing")),
            splits=_typed(Splits, config, "splits"),
            pairs=_typed(PairSettings, config, "pairs"),
            data=_data(config, seed),
            evaluation=_typed(EvaluationSettings, config, "evaluation", refine=_refine(config)),
            native=_typed(NativeSettings, config, "native_evaluation"),
            real_anatomy=_typed(RealAnatomyConfig, config, "real_anatomy", seed=seed),
            batch=_typed(BatchSettings, config, "batch"),
            timing=_typed(TimingSettings, config, "timing"),
            speed_profile=_typed(SpeedProfileSettings, config, "speed_profile"),
            benchmark=_typed(BenchmarkSettings, config, "benchmark"),
            greedy=_greedy(config),
        )


def _data(config: dict, seed: int) -> DataSettings:
    synthetic = dict(_section(config, "data.synthetic"))
    synthetic["gamma_range"] = tuple(_section(config, "data.synthetic.gamma_range"))
    return _typed(DataSettings, config, "data", synthetic=SyntheticConfig(seed=seed, **synthetic))


def _refine(config: dict) -> RefineSettings:
    refine = _section(config, "evaluation.refine")
    key = lambda name: _section(config, f"evaluation.refine.{name}")  # noqa: E731
    return RefineSettings(optimise_steps=tuple(key("optimise_steps")), models=tuple(key("models")),
                          steps=tuple(key("steps")), spacings=tuple(key("spacings") or REFINE_SPACINGS),
                          with_spacings=tuple(_with_spacings(s) for s in key("with_spacings")),
                          optimiser={k: refine[k] for k in OPTIMISER_OPTIONS if k in refine})


def _with_spacings(setting: dict) -> tuple:
    """One ``evaluation.refine.with_spacings`` entry as (steps, spacings), its steps' count per level checked."""
    steps, spacings = parse_refine_steps(setting["steps"]), tuple(setting["spacings"])
    try:
        check_steps_per_level(steps, spacings)
    except ValueError as exc:
        raise ConfigKeyError(f"config: evaluation.refine.with_spacings: {exc}") from None
    return steps, spacings


def _greedy(config: dict) -> dict:
    if not _section(config, "peers.greedy.enabled"):
        return {}
    return {name: GreedySetting(**setting) for name, setting in _section(config, "peers.greedy.settings").items()}


ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILE = ROOT / "config.yaml"
SCHEMA_FILE = ROOT / "workflow" / "schemas" / "config.schema.yaml"


def merged(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base`` as ``snakemake --configfile BASE OVERLAY`` merges them: key by key
    into nested mappings, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(*overlays, base=CONFIG_FILE) -> dict:
    """The run config the workflow would see: config.yaml with each overlay (a YAML path or a
    dict) merged over it, validated against the schema, which fills in the keys left out (as the
    Snakefile's ``validate`` does). For the package's jobs without Snakemake."""
    import yaml
    from snakemake.utils import validate

    def read(source):
        return dict(source) if isinstance(source, dict) else yaml.safe_load(Path(source).read_text()) or {}

    config = read(base)
    for overlay in overlays:
        config = merged(config, read(overlay))
    validate(config, str(SCHEMA_FILE))
    return config
