"""Cross-key config checks the schema cannot express. Kept free of torch so that the Snakefile
can run them at parse time (a bad combination stops before any job runs) and the jobs that
depend on them run the same ones."""
from __future__ import annotations


def speed_profile_problems(sp: dict, trained: list[str]) -> list[str]:
    """What is wrong with the ``speed_profile`` section given the models the run trains."""
    problems = []
    unknown = [m for m in sp["models"] if m not in trained]
    if unknown:
        problems.append(f"speed_profile.models names {unknown}, which this configuration does not train; trained "
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


def config_problems(config: dict, trained: list[str]) -> list[str]:
    """Every cross-key problem of a validated config, given the models the run trains."""
    problems = speed_profile_problems(config["speed_profile"], trained)
    unknown = [m for m in config["evaluation"]["refine"]["models"] if m not in trained]
    if unknown:
        problems.append(f"evaluation.refine.models names {unknown}, which this configuration does not train; "
                        f"trained models: {list(trained)}")
    return problems
