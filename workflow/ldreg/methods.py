"""What the evaluation rows are: a method's name parsed once into a value (kind, the model
it needs, its refinement steps, a peer's setting). Torch-free, so that the Snakefile can use
it at parse time and every job reads names the same way.

Names: ``identity`` (no registration), ``affine`` (the teacher's affine stage alone), a model
name (``teacher``, ``student_<variant>``, ``peer_voxelmorph``), ``optimise<K>`` (K steps of
per-pair optimisation from a zero field), ``<model>+refine<K>`` (the model's field refined by K
steps, as ``register --refine-steps K``), ``<model>+refine<K>_<mm>-<mm>mm`` (the same with
``--refine-spacings <mm>,<mm>``; at the scan's own resolution only), ``<model>+refine<A>x<B>_<mm>-<mm>mm``
(each level's own iterations, ``register --refine-steps AxB``; at the scan's own resolution only),
``peer_ants_syn`` and ``peer_greedy_<setting>``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

ANTS = "peer_ants_syn"
GREEDY_PREFIX = "peer_greedy_"
KINDS = ("identity", "affine", "model", "optimise", "refine", "ants", "greedy")


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    model: str | None = None  # the model file it needs (None: none)
    steps: int | tuple[int, ...] = 0  # per-pair optimisation steps (optimise, refine; refine: or each level's)
    spacings: tuple[float, ...] | None = None  # refine: its levels in mm (None: the run's, else register's default)
    setting: str | None = None  # a Greedy setting's name

    @property
    def optimises(self) -> bool:
        """Per-pair optimisation, alone or after a network (the tables' orange rows)."""
        return self.kind in ("optimise", "refine")

    @property
    def peer(self) -> bool:
        """An optimiser users would pick instead (no model file)."""
        return self.kind in ("ants", "greedy")


def parse_method(name: str) -> Method:
    if name == "identity":
        return Method(name, "identity")
    if name == "affine":
        return Method(name, "affine", model="teacher")
    if name == ANTS:
        return Method(name, "ants")
    if name.startswith(GREEDY_PREFIX) and len(name) > len(GREEDY_PREFIX):
        return Method(name, "greedy", setting=name[len(GREEDY_PREFIX):])
    if match := re.fullmatch(r"optimise(\d+)", name):
        return Method(name, "optimise", steps=int(match[1]))
    if match := re.fullmatch(r"(.+)\+refine(\d+(?:x\d+)*)(?:_(\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)*)mm)?", name):
        spacings = tuple(float(s) for s in match[3].split("-")) if match[3] else None
        return Method(name, "refine", model=match[1], steps=parse_refine_steps(match[2]), spacings=spacings)
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"not a method name: {name!r}")
    return Method(name, "model", model=name)


def greedy_method(setting: str) -> str:
    return f"{GREEDY_PREFIX}{setting}"


def refined_method(model: str, steps, spacings=None) -> str:
    """``steps``: K or each level's iterations (:func:`parse_refine_steps`); ``spacings`` (mm,
    coarse to fine): the refinement's own levels, named in the method."""
    levels = f"_{'-'.join(f'{float(s):g}' for s in spacings)}mm" if spacings else ""
    return f"{model}+refine{format_refine_steps(parse_refine_steps(steps))}{levels}"


def parse_refine_steps(steps) -> int | tuple[int, ...]:
    """The refinement's iterations as ``register --refine-steps`` reads them: ``K`` (an int or
    its digits: K at the coarsest level, half as many at each finer one) or ``AxBxC`` (each
    level's own, coarse to fine, Greedy's ``-n`` syntax; a tuple). ValueError otherwise."""
    if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0:
        return steps
    if isinstance(steps, (tuple, list)) and len(steps) > 1 and all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in steps):
        return tuple(steps)
    if isinstance(steps, str) and re.fullmatch(r"\d+(x\d+)*", steps):
        values = tuple(int(k) for k in steps.split("x"))
        return values[0] if len(values) == 1 else values
    raise ValueError(f"refinement steps must read like 10 (iterations at the coarsest level, half as many at "
                     f"each finer one) or 10x10x2 (each level's, coarse to fine), got {steps!r}")


def check_steps_per_level(steps, spacings) -> None:
    """ValueError unless ``steps`` (:func:`parse_refine_steps`'s), where it gives each level's
    iterations, has one count >= 0 for each of ``spacings`` (mm)."""
    if isinstance(steps, tuple) and (len(steps) != len(spacings) or any(k < 0 for k in steps)):
        raise ValueError(f"refinement steps {format_refine_steps(steps)} gives {len(steps)} levels' iterations for "
                         f"{len(spacings)} spacings ({', '.join(f'{float(s):g}' for s in spacings)} mm): "
                         "one count >= 0 per level needed")


def format_refine_steps(steps) -> str:
    """``10`` or ``10x10x2``: how method names and ``--refine-steps`` write the iterations."""
    return "x".join(map(str, steps)) if isinstance(steps, tuple) else str(steps)
