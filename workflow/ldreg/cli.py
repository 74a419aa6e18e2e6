"""Command line: ``ldreg register | info | export`` (``register`` is also its own command).

``register`` takes a NIfTI pair on any grid and orientation, applies the preprocessing stored
in the model file, predicts the field, maps it back to the fixed image's own grid and writes
the warped image (and labels) with the fixed image's affine and header (see
:mod:`ldreg.register` for the field's convention)."""
from __future__ import annotations

import argparse
import json
import sys
import time

# nothing heavy at the top: `--help` and argument errors answer before torch is imported
from .defaults import PRECISION_NAMES, REFINE_SPACINGS, REFINE_STEPS
from .methods import format_refine_steps, parse_refine_steps

_STARTED = time.perf_counter()  # the process's imports up to here are a few milliseconds


def _registrar(args):
    """The model loaded as ``register`` and ``register-batch`` run it; (registrar, precision)."""
    import torch

    from .allocator import keep_freed_memory
    from .engines import default_precision, precision_native, skip_reason
    from .optimise import refine_schedule
    from .register import Registrar

    keep_freed_memory()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = default_precision(args.device) if args.precision == "auto" else args.precision
    if args.device == "cpu" and not precision_native(precision):
        print(f"warning: --precision {precision}: {skip_reason(precision).removeprefix('skipped: ')}; "
              "--precision auto picks float32 here", file=sys.stderr)
    # channels-last helps float32 too (oneDNN's fast 3D kernels): 1.69 -> 1.32 s at 128^3, 2 threads
    levels = refine_schedule(args.refine_steps, args.refine_spacings)
    return Registrar(args.model, args.device, precision, channels_last=True, refine_levels=levels), precision


def _cmd_register(args) -> None:
    from .register import write_outputs

    t0 = time.perf_counter()
    registrar, precision = _registrar(args)
    load_seconds = time.perf_counter() - t0
    result = registrar.register(args.moving, args.fixed, args.moving_labels)
    t = time.perf_counter()
    write_outputs(result, args.warped, args.field, args.warped_labels, args.field_in_fixed_voxels)
    times = {"start_up": t0 - _STARTED, "load_model": load_seconds, **result["times"], "write": time.perf_counter() - t}
    print(f"{'precision':>11}: {precision}")
    for stage, seconds in times.items():
        print(f"{stage:>11}: {seconds:7.3f} s")
    print(f"{'total':>11}: {time.perf_counter() - _STARTED:7.3f} s (start_up: the imports after Python's own start)")


def _cmd_register_batch(args) -> None:
    import logging

    from .batch import BatchOptions, batch_pairs, register_batch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    pairs = batch_pairs(args.pairs, args.moving_dir, args.fixed, args.pattern)
    registrar, _ = _registrar(args)
    options = BatchOptions(suffix=args.suffix, qc=args.qc, write_field=not args.no_field)
    summary = register_batch(registrar, pairs, args.out_dir, options)
    print(summary.drop(columns=["moving", "fixed"], errors="ignore").to_string(index=False, float_format="%.3f"))
    print(f"summary: {args.out_dir}/summary.csv" + (f", pictures: {args.out_dir}/report.md" if args.qc else ""))
    if (summary.status == "error").any():
        raise _BatchFailed(f"{int((summary.status == 'error').sum())} of {len(summary)} pairs failed (see the summary)")


class _BatchFailed(Exception):
    """Some pairs of a batch failed; the others completed."""


def _cmd_info(args) -> None:
    from .modelfile import load_model
    from .networks import complexity

    model, prep, payload = load_model(args.model)
    info = complexity(model, prep.grid)
    out = {"name": payload["name"], "architecture": payload["spec"], "parameters": info["parameters"],
           "gflops_per_pair": round(info["flops"] / 1e9, 3), "preprocessing": payload["preprocessing"],
           "training": payload["training"]}
    print(json.dumps(out, indent=2, default=str))


def export_model(model_path, out_path, fmt: str) -> None:
    import torch

    from .io import InputError
    from .modelfile import load_model

    class FlowOnly(torch.nn.Module):
        """The exported graph: (moving, fixed) -> composed field."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, moving, fixed):
            return self.model(moving, fixed)["flow"]

    model, prep, _ = load_model(model_path)
    wrapper = FlowOnly(model).eval()
    example = (torch.rand(1, 1, *prep.grid), torch.rand(1, 1, *prep.grid))
    if fmt == "torchscript":
        with torch.inference_mode():
            traced = torch.jit.trace(wrapper, example, check_trace=False)
        traced.save(str(out_path))
    elif fmt == "onnx":
        torch.onnx.export(wrapper, example, str(out_path), input_names=["moving", "fixed"], output_names=["flow"],
                          opset_version=20, dynamo=True)
    else:
        raise InputError(f"unknown export format {fmt!r}: expected torchscript or onnx")


def _cmd_export(args) -> None:
    export_model(args.model, args.output, args.format)
    print(f"wrote {args.output}")


def _model_args(p) -> None:
    """The options ``register`` and ``register-batch`` share: the model and how it runs."""
    p.add_argument("--model", required=True, help="model file (.pt) written by the workflow")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", choices=["auto", *sorted(PRECISION_NAMES)], default="auto",
                   help="convolutions (channels-last) in float32 or bfloat16; auto: bfloat16 where the CPU has "
                        "bf16 units (AMX, AVX512-BF16), else float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--refine-steps", type=_refine_steps, default=None, metavar="K|AxBxC",
                   help="refine the network's map on the pair's own images, coarse to fine (Greedy's scheme: local "
                        "NCC, smoothed steps): K iterations at the coarsest --refine-spacings level, half as many at "
                        "each finer one, or AxBxC: each level's own, as Greedy's -n (default: "
                        f"{format_refine_steps(REFINE_STEPS)}); 0: the network alone")
    p.add_argument("--refine-spacings", type=_spacings, default=REFINE_SPACINGS, metavar="MM,MM",
                   help="the refinement's levels in mm, coarse to fine (default: "
                        f"{','.join(f'{s:g}' for s in REFINE_SPACINGS)}); the last is the finest spacing it reaches")


def _register_args(p) -> None:
    _model_args(p)
    p.add_argument("--moving", required=True)
    p.add_argument("--fixed", required=True)
    p.add_argument("--warped", required=True, help="output: moving image warped onto the fixed grid")
    p.add_argument("--field", help="output: displacement field as ITK, ANTs and 3D Slicer apply it (physical mm on "
                                   "LPS axes, 5D vector NIfTI (D, H, W, 1, 3) on the fixed image's grid)")
    p.add_argument("--field-in-fixed-voxels", action="store_true",
                   help="write the field instead as (D, H, W, 3) in voxels of the fixed image (RAS voxel axes; no "
                        "other tool reads this)")
    p.add_argument("--moving-labels", help="label map of the moving image")
    p.add_argument("--warped-labels", help="output: moving labels warped (nearest)")
    p.set_defaults(func=_cmd_register)


def _batch_args(p) -> None:
    _model_args(p)
    p.add_argument("--pairs", help="CSV of pairs: columns moving, fixed (optional: pair_id, moving_labels, "
                                   "fixed_labels for Dice); relative paths from the CSV's folder")
    p.add_argument("--moving-dir", help="instead of --pairs: a folder of moving scans, each registered to --fixed")
    p.add_argument("--fixed", help="with --moving-dir: the fixed image (a template)")
    p.add_argument("--pattern", default="*.nii*", help="with --moving-dir: which files (default: %(default)s)")
    p.add_argument("--out-dir", required=True, help="one folder per pair, summary.csv/.md (and report.md)")
    p.add_argument("--suffix", choices=[".nii.gz", ".nii"], default=".nii.gz", help="of the images written")
    p.add_argument("--qc", action="store_true", help="a picture per pair (qc.png) and a page of them (report.md)")
    p.add_argument("--no-field", action="store_true", help="do not write the displacement fields")
    p.set_defaults(func=_cmd_register_batch)


def _cmd_docs(args) -> None:
    from .docs import render_blocks, update_markdown
    from .io import InputError

    blocks = render_blocks(args.results)
    if not blocks:
        raise InputError(f"{args.results}/tables: no tables to render (run the workflow first)")
    for path in args.files:
        print(f"{path}: {', '.join(update_markdown(path, blocks)) or 'no generated block'}")


def _refine_steps(text: str):
    try:
        return parse_refine_steps(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _spacings(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"spacings must read like '4,2' (mm, coarse to fine), got {text!r}") from None
    if not values or any(v <= 0 for v in values) or list(values) != sorted(values, reverse=True):
        raise argparse.ArgumentTypeError(f"spacings must be positive and coarse to fine, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldreg", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _register_args(sub.add_parser("register", help="register a NIfTI pair with a trained model"))
    _batch_args(sub.add_parser("register-batch", help="register many pairs (a CSV, or a folder to one template) in "
                                                      "one process; resumes, skips complete pairs"))
    info = sub.add_parser("info", help="architecture, parameters, FLOPs and training of a model file")
    info.add_argument("model")
    info.set_defaults(func=_cmd_info)
    export = sub.add_parser("export", help="export the field predictor (TorchScript or ONNX)")
    export.add_argument("model")
    export.add_argument("--format", choices=["torchscript", "onnx"], required=True)
    export.add_argument("--output", required=True)
    export.set_defaults(func=_cmd_export)
    docs = sub.add_parser("docs", help="write a run's headline tables into Markdown files (between "
                                       "'<!-- begin generated: NAME -->' markers)")
    docs.add_argument("files", nargs="+", help="Markdown files to update, e.g. README.md docs/results.md")
    docs.add_argument("--results", default="results", help="the run's results folder (default: %(default)s)")
    docs.set_defaults(func=_cmd_docs)
    est = sub.add_parser("estimate", help="time a student training step on this CPU against the reference run's "
                                          "(the ratio a run's duration estimate scales by)")
    est.add_argument("--record", metavar="RESULTS",
                     help="write a new reference run from this finished run's benchmarks (RESULTS/benchmarks)")
    est.add_argument("--config", default="config.yaml", help="the run's config (with --record; default: %(default)s)")
    est.add_argument("--cores", type=int, default=2, help="the cores the recorded run had (default: %(default)s)")
    est.set_defaults(func=_cmd_estimate)
    return parser


def _cmd_estimate(args) -> None:
    from pathlib import Path

    import yaml

    from . import estimate
    from .engines import cpu_summary

    reference = estimate.load_reference()
    seconds = estimate.calibrate(reference["grid"])
    print(f"{cpu_summary()}: {seconds:.3f} s a training step of the default student at {reference['grid']}, one "
          f"thread; the reference run's CPU ({reference['cpu']}): {reference['calibration_s_per_step']:.3f} s "
          f"({seconds / reference['calibration_s_per_step']:.2f}x)")
    if args.record:
        config = yaml.safe_load(Path(args.config).read_text())
        bench = Path(args.record) / "benchmarks"
        planned = estimate.planned_from_benchmarks(bench, config, args.cores)
        new = estimate.reference_from_benchmarks(bench, planned, config["preprocessing"]["grid"], seconds, cpu_summary())
        estimate.REFERENCE_FILE.write_text(json.dumps(new, indent=1) + "\n")
        print(f"wrote {estimate.REFERENCE_FILE} ({len(new['jobs'])} jobs)")


def _run(args) -> int:
    if getattr(args, "warped_labels", None) and not getattr(args, "moving_labels", None):
        print("error: --warped-labels needs --moving-labels", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except (ValueError, OSError, _BatchFailed) as exc:  # ldreg.io.InputError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    return _run(_parser().parse_args(argv))


def register_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="register", description="register a NIfTI pair with a trained ldreg model")
    _register_args(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
