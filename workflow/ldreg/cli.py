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

import torch

from .io import InputError
from .modelfile import load_model
from .engines import default_precision, precision_native, skip_reason
from .networks import PRECISIONS, complexity
from .optimise import DEFAULT_REFINE_SPACINGS, DEFAULT_REFINE_STEPS, refine_schedule
from .register import Registrar, write_outputs


def _cmd_register(args) -> None:
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = default_precision(args.device) if args.precision == "auto" else args.precision
    if args.device == "cpu" and not precision_native(precision):
        print(f"warning: --precision {precision}: {skip_reason(precision).removeprefix('skipped: ')}; "
              "--precision auto picks float32 here", file=sys.stderr)
    # channels-last helps float32 too (oneDNN's fast 3D kernels): 1.69 -> 1.32 s at 128^3, 2 threads
    levels = refine_schedule(args.refine_steps, args.refine_spacings)
    registrar = Registrar(args.model, args.device, precision, channels_last=True, refine_levels=levels)
    load_seconds = time.perf_counter() - t0
    result = registrar.register(args.moving, args.fixed, args.moving_labels)
    t = time.perf_counter()
    write_outputs(result, args.warped, args.field, args.warped_labels, args.field_in_fixed_voxels)
    times = {"load_model": load_seconds, **result["times"], "write": time.perf_counter() - t}
    print(f"{'precision':>11}: {precision}")
    for stage, seconds in times.items():
        print(f"{stage:>11}: {seconds:7.3f} s")
    print(f"{'total':>11}: {time.perf_counter() - t0:7.3f} s")


def _cmd_info(args) -> None:
    model, prep, payload = load_model(args.model)
    info = complexity(model, prep.grid)
    out = {"name": payload["name"], "architecture": payload["spec"], "parameters": info["parameters"],
           "gflops_per_pair": round(info["flops"] / 1e9, 3), "preprocessing": payload["preprocessing"],
           "training": payload["training"]}
    print(json.dumps(out, indent=2, default=str))


class _FlowOnly(torch.nn.Module):
    """The exported graph: (moving, fixed) -> composed field."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, moving, fixed):
        return self.model(moving, fixed)["flow"]


def export_model(model_path, out_path, fmt: str) -> None:
    model, prep, _ = load_model(model_path)
    wrapper = _FlowOnly(model).eval()
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


def _register_args(p) -> None:
    p.add_argument("--model", required=True, help="model file (.pt) written by the workflow")
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
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", choices=["auto", *sorted(PRECISIONS)], default="auto",
                   help="convolutions (channels-last) in float32 or bfloat16; auto: bfloat16 where the CPU has "
                        "bf16 units (AMX, AVX512-BF16), else float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--refine-steps", type=int, default=DEFAULT_REFINE_STEPS, metavar="K",
                   help="refine the network's map on the pair's own images, coarse to fine (Greedy's scheme: local "
                        "NCC, smoothed steps): K iterations at the coarsest --refine-spacings level, half as many at "
                        "each finer one (default: %(default)s); 0: the network alone")
    p.add_argument("--refine-spacings", type=_spacings, default=DEFAULT_REFINE_SPACINGS, metavar="MM,MM",
                   help="the refinement's levels in mm, coarse to fine (default: %(default)s); the last is the "
                        "finest spacing it reaches")
    p.set_defaults(func=_cmd_register)


def _cmd_docs(args) -> None:
    from .docs import render_blocks, update_markdown

    blocks = render_blocks(args.results)
    if not blocks:
        raise InputError(f"{args.results}/tables: no tables to render (run the workflow first)")
    for path in args.files:
        print(f"{path}: {', '.join(update_markdown(path, blocks)) or 'no generated block'}")


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
    return parser


def _run(args) -> int:
    if getattr(args, "warped_labels", None) and not getattr(args, "moving_labels", None):
        print("error: --warped-labels needs --moving-labels", file=sys.stderr)
        return 2
    if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda asked for but CUDA is not available", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except (InputError, ValueError, OSError) as exc:
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
