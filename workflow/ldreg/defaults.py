"""``register``'s defaults, in a module that imports nothing: the command line reads them to
print its help before anything heavy (torch) is imported."""
from __future__ import annotations

# the refinement's levels (mm), coarse to fine, and its iterations at the coarsest (halved at
# each finer level, as Greedy's schedules go): chosen by measurement, docs/experiments.md
REFINE_SPACINGS = (4.0, 3.0, 2.0)
# the setting the README recommends: the fewest steps whose Dice on the tuning pairs beats
# Greedy 10x5x0's by at least 0.005 (its run-to-run spread is ~0.003): docs/experiments.md
REFINE_STEPS = 10
# the convolutions' number formats (ldreg.networks.PRECISIONS holds their torch types)
PRECISION_NAMES = ("bfloat16", "float32")
