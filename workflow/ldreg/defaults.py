"""``register``'s defaults, in a module that imports nothing: the command line reads them to
print its help before anything heavy (torch) is imported."""
from __future__ import annotations

# the refinement's levels (mm), coarse to fine, and each level's iterations: chosen by
# measurement on tuning pairs, docs/experiments.md (2026-12-06): the most accurate setting in no
# more time than the earlier default (10 at 4 mm halved at each finer level: 10, 5, 2); a 3 mm
# iteration costs a fifth of a 2 mm one and the network's start has done the coarse work
REFINE_SPACINGS = (4.0, 3.0, 2.0)
REFINE_STEPS = (10, 10, 2)
# the convolutions' number formats (ldreg.networks.PRECISIONS holds their torch types)
PRECISION_NAMES = ("bfloat16", "float32")
