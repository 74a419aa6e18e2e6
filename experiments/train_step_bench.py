"""Seconds per training step (forward, backward, Adam; local NCC + diffusion smoothness) of the
teacher and student networks at each field resolution, on random input at the default grid.

    OMP_NUM_THREADS=2 python experiments/train_step_bench.py --threads 2 [--grid 48 64 48]

Prints one line per network: the median of ``--steps`` timed steps after one warm-up step.
"""
import argparse
import statistics
import time

import torch

from ldreg.losses import local_ncc_loss, smoothness_loss
from ldreg.networks import build_network

NETWORKS = {
    "teacher, full field": dict(kind="teacher", cascades=2),
    "teacher, quarter field": dict(kind="teacher", cascades=2, flow_level=2, flow_scale=10.0),
    "student, full field": dict(kind="student"),
    "student, half field": dict(kind="student", flow_level=1),
    "student, quarter field": dict(kind="student", flow_level=2, flow_scale=10.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", type=int, nargs=3, default=[48, 64, 48])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    moving, fixed = torch.rand(1, 1, *args.grid), torch.rand(1, 1, *args.grid)
    for name, spec in NETWORKS.items():
        net = build_network(spec)
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        times = []
        for _ in range(args.steps + 1):
            start = time.perf_counter()
            out = net(moving, fixed)
            dense = out["fields"][1:]
            loss = local_ncc_loss(out["warped"], fixed) + sum(smoothness_loss(f) for f in dense) / len(dense)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        print(f"{name:24s} {statistics.median(times[1:]):.3f} s a step ({args.threads} thread(s), grid {args.grid})",
              flush=True)


if __name__ == "__main__":
    main()
