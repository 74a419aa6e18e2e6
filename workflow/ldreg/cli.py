"""Command line: ``ldreg register | info | export`` (``register`` is also its own command).

``register`` takes a NIfTI pair on any grid and orientation, applies the preprocessing stored
in the model file, predicts the field, maps it back to the fixed image's own grid and writes
the warped image (and labels) with the fixed image's affine and header. The written field is
(D, H, W, 3) in voxels of the fixed image: fixed voxel ``y`` corresponds to the moving image's
point that lies at fixed-voxel coordinates ``y + u(y)``."""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from .data import preprocess_image
from .io import InputError, field_to_nifti_array, load_volume, save_volume
from .modelfile import load_model
from .networks import complexity


def _sample(volume: torch.Tensor, coords: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample a (D, H, W) volume at voxel coordinates (3, ...) with border clamping."""
    shape = torch.tensor(volume.shape, dtype=coords.dtype).view(3, *[1] * (coords.ndim - 1))
    norm = 2 * coords / (shape - 1).clamp_min(1) - 1
    grid = norm.flip(0).permute(*range(1, coords.ndim), 0).reshape(1, -1, 1, 1, 3)
    out = F.grid_sample(volume[None, None], grid, mode=mode, padding_mode="border", align_corners=True)
    return out.reshape(coords.shape[1:])


def _apply(affine: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    a = torch.from_numpy(affine).to(points.dtype)
    return torch.einsum("ij,j...->i...", a[:3, :3], points) + a[:3, 3].view(3, *[1] * (points.ndim - 1))


def register_pair(model_path, moving_path, fixed_path, moving_labels_path=None, device="cpu", threads=None):
    """Register one pair; returns a dict of arrays in the fixed image's grid and stage times."""
    times = {}
    t = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    model, prep, _ = load_model(model_path, device)
    times["load_model"] = time.perf_counter() - t
    t = time.perf_counter()
    moving_raw, moving_img = load_volume(moving_path, "image")
    fixed_raw, fixed_img = load_volume(fixed_path, "image")
    moving_pre, _, moving_pre_affine, _ = preprocess_image(moving_path, prep)
    fixed_pre, _, fixed_pre_affine, _ = preprocess_image(fixed_path, prep)
    times["preprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    with torch.inference_mode():
        flow = model(torch.from_numpy(moving_pre)[None, None].to(device), torch.from_numpy(fixed_pre)[None, None].to(device))["flow"]
    flow = flow[0].float().cpu()
    times["network"] = time.perf_counter() - t
    t = time.perf_counter()
    with torch.inference_mode():
        # fixed voxel -> world -> preprocessed fixed voxel -> + flow -> world -> moving voxel
        shape = fixed_raw.shape
        grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
        world = _apply(fixed_img.affine, grid)
        x_pre = _apply(np.linalg.inv(fixed_pre_affine), world)
        disp = torch.stack([_sample(flow[i], x_pre, "bilinear") for i in range(3)])
        moving_world = _apply(moving_pre_affine, x_pre + disp)
        moving_vox = _apply(np.linalg.inv(moving_img.affine), moving_world)
        warped = _sample(torch.from_numpy(moving_raw), moving_vox, "bilinear")
        field = _apply(np.linalg.inv(fixed_img.affine), moving_world) - grid
        warped_labels = None
        if moving_labels_path:
            labels, labels_img = load_volume(moving_labels_path, "labels")
            if labels.shape != moving_raw.shape or not np.allclose(labels_img.affine, moving_img.affine, atol=1e-3):
                raise InputError(f"{moving_labels_path}: label map is not on the grid of {moving_path}")
            warped_labels = _sample(torch.from_numpy(labels.astype(np.float64)), moving_vox.double(), "nearest").round().numpy().astype(np.int32)
    times["warp"] = time.perf_counter() - t
    return {"warped": warped.numpy(), "field": field.numpy(), "warped_labels": warped_labels, "fixed_img": fixed_img,
            "times": times}


def _cmd_register(args) -> None:
    t0 = time.perf_counter()
    result = register_pair(args.model, args.moving, args.fixed, args.moving_labels, args.device, args.threads)
    t = time.perf_counter()
    fixed_img = result["fixed_img"]
    save_volume(args.warped, result["warped"], fixed_img.affine, fixed_img.header, np.float32)
    if args.field:
        save_volume(args.field, field_to_nifti_array(result["field"]), fixed_img.affine, fixed_img.header)
    if args.warped_labels:
        save_volume(args.warped_labels, result["warped_labels"], fixed_img.affine, fixed_img.header, np.int32)
    result["times"]["write"] = time.perf_counter() - t
    for stage, seconds in result["times"].items():
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
    p.add_argument("--field", help="output: displacement field (D, H, W, 3), fixed voxels")
    p.add_argument("--moving-labels", help="label map of the moving image")
    p.add_argument("--warped-labels", help="output: moving labels warped (nearest)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.set_defaults(func=_cmd_register)


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
