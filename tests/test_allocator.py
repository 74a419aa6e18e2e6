"""Freed memory kept for reuse: large tensors after the first cost no new pages."""
import json
import subprocess
import sys

import pytest

_PROBE = """
import json, resource, torch
from ldreg.allocator import keep_freed_memory
applied = keep_freed_memory()
def touch():
    x = torch.ones(16 << 20)  # 64 MB: above glibc's largest mmap threshold
    return float(x[::4096].sum())
for _ in range(10):  # the heap settles (the first blocks land between other allocations)
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    touch()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _probe(keep: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "LDREG_KEEP_FREED_MEMORY": keep})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_tensors_reuse_freed_memory_instead_of_faulting_in_new_pages():
    kept, released = _probe("1"), _probe("0")
    assert kept["applied"] and not released["applied"]
    # five 64 MB tensors: 16384 pages each when every one is fresh memory, (almost) none when reused
    assert released["faults"] > 5 * 10000
    assert kept["faults"] < 0.1 * released["faults"]
