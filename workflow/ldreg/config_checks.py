"""Cross-key config checks the schema cannot express. Kept free of torch so that the Snakefile
can run them at parse time (a bad combination stops before any job runs) and the jobs that
depend on them run the same ones."""
from __future__ import annotations


def speed_profile_problems(sp: dict, trained: list[str]) -> list[str]:
    """What is wrong with the ``speed_profile`` section given the models the run trains."""
    problems = []
    unknown = [m for m in sp["models"] if m not in trained]
    if unknown:
        problems.append(f"speed_profile.models names {unknown}, which this configuration does not train; models `all` trains "
                        f"models: {list(trained)}")
    if sp["baseline_model"] not in sp["models"]:
        problems.append(f"speed_profile.baseline_model {sp['baseline_model']!r} must be one of speed_profile.models "
                        f"{sp['models']}")
    if sp["reference_engine"] not in sp["engines"]:
        problems.append(f"speed_profile.reference_engine {sp['reference_engine']!r} must be one of "
                        f"speed_profile.engines {sp['engines']}")
    if sp.get("reference_model") and sp["reference_model"] not in sp["models"]:
        problems.append(f"speed_profile.reference_model {sp['reference_model']!r} must be one of speed_profile.models "
                        f"{sp['models']}")
    return problems


def switched_on_variants(config: dict) -> list[str]:
    """Every student variant the configuration keeps (null switches one off): the ablation's."""
    return [v for v, own in config["students"]["variants"].items() if own is not None]


def headline_variants(config: dict) -> list[str]:
    """The student variants `all` trains: ``students.headline`` (null: every switched-on one).
    Names that are not switched on are left out here and reported by :func:`config_problems`."""
    on = switched_on_variants(config)
    headline = config["students"].get("headline")
    return on if headline is None else [v for v in headline if v in on]


def student_variant(config: dict, variant: str) -> dict:
    """A student variant's settings: its own over the students' defaults, the ``train`` options
    merged key by key."""
    students = config["students"]
    if variant not in students["variants"]:
        raise ValueError(f"unknown student variant {variant!r}; configured: {sorted(students['variants'])}")
    defaults, own = students.get("defaults", {}), students["variants"][variant] or {}
    return {**defaults, **own, "train": {**defaults.get("train", {}), **own.get("train", {})}}


def student_uses_teacher(config: dict, variant: str) -> bool:
    """Whether the variant learns from the teacher's cached fields (distillation or the critic)."""
    train = student_variant(config, variant)["train"]
    return train.get("distillation", "none") != "none" or bool(train.get("adversarial", False))


def student_targets(config: dict, variant: str) -> str | None:
    """Which teacher cache the variant learns from: "raw", "refined", or None (no teacher)."""
    if not student_uses_teacher(config, variant):
        return None
    return student_variant(config, variant).get("targets", "raw")


def config_problems(config: dict, trained: list[str]) -> list[str]:
    """Every cross-key problem of a validated config, given the models the run trains."""
    problems = speed_profile_problems(config["speed_profile"], trained)
    on = switched_on_variants(config)
    off = [v for v in config["students"].get("headline") or [] if v not in on]
    if off:
        problems.append(f"students.headline names {off}, which are not switched-on variants; variants: {on}")
    for variant, own in config["students"]["variants"].items():
        if own is None:
            continue
        asked = student_variant(config, variant).get("targets")
        if asked == "refined" and not student_uses_teacher(config, variant):
            problems.append(f"students.variants.{variant}: targets: refined, but the variant uses no teacher field "
                            "(set distillation or adversarial)")
        elif asked == "refined" and not config.get("teacher_cache", {}).get("refine", {}).get("steps"):
            problems.append(f"students.variants.{variant}: targets: refined needs teacher_cache.refine.steps >= 1")
    unknown = [m for m in config["evaluation"]["refine"]["models"] if m not in trained]
    if unknown:
        problems.append(f"evaluation.refine.models names {unknown}, which this configuration does not train; "
                        f"models `all` trains (students.headline): {list(trained)}")
    return problems
