"""The core micro-benchmark (`snakemake benchmark_core`, outside `all`) on a small grid."""
import numpy as np

from ldreg.benchmark import core_benchmark


def test_core_benchmark_times_dice_and_both_student_sizes():
    frame = core_benchmark(repeats=1, grid=(16, 16, 16))
    assert list(frame.benchmark) == ["dice_116_labels", "student_forward_1_cascade", "student_forward_3_cascade"]
    assert (frame.seconds > 0).all() and (frame.grid == "16x16x16").all()
    flops = frame.set_index("benchmark").gflops
    # three cascades cost more than one (the shared affine stage aside)
    assert np.isnan(flops["dice_116_labels"]) and flops["student_forward_3_cascade"] > 2 * flops["student_forward_1_cascade"]
