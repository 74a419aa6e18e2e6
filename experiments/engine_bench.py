"""Benchmark (issue 14, item 2): the network stage of a model under each CPU inference engine
this machine runs, side by side: PyTorch float32 as trained, float32 channels-last, TorchScript
(traced, frozen), ONNX Runtime float32, and ONNX Runtime int8 (static post-training quantisation
of the convolutions, calibrated on training pairs). For each: median seconds of one forward pass
at the model's grid, and mean test Dice against the float32 model's (an engine is only worth
keeping within 0.005 Dice).

    python experiments/engine_bench.py results/models/student_unsupervised.pt \
        results results/benchmarks/engines.csv [--threads 2] [--repeats 20]

Not part of `all`: a research tool (docs/performance.md has the figures and the machine)."""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from ldreg.engines import cpu_summary
from ldreg.evaluate import evaluate_pairs, summary
from ldreg.io import write_csv
from ldreg.modelfile import load_model
from ldreg.networks import prepare_for_inference
from ldreg.training import load_images


class FieldOnly(torch.nn.Module):
    """(moving, fixed) -> composed field, without warping the moving image."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, moving, fixed):
        return self.model(moving, fixed, warp=False)["flow"]


def _ort_session(path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda m, f: torch.from_numpy(session.run(None, {"moving": m.numpy(), "fixed": f.numpy()})[0])


def engines(model_path, calibration: list[tuple[torch.Tensor, torch.Tensor]], threads: int, workdir: Path) -> dict:
    """Engine name -> predict(moving, fixed) -> field, or the reason it could not be built."""
    out = {}
    example = calibration[0]
    plain = FieldOnly(load_model(model_path)[0]).eval()
    out["torch float32"] = plain
    out["torch float32 channels-last"] = FieldOnly(prepare_for_inference(load_model(model_path)[0], "float32", True))
    try:
        with torch.inference_mode():
            out["torchscript (traced, frozen)"] = torch.jit.freeze(torch.jit.trace(plain, example, check_trace=False))
    except Exception as exc:  # a benchmark row says why, the others still run
        out["torchscript (traced, frozen)"] = f"failed: {type(exc).__name__}: {exc}"[:300]
    onnx_path = workdir / "model.onnx"
    try:
        torch.onnx.export(plain, example, str(onnx_path), input_names=["moving", "fixed"], output_names=["flow"],
                          opset_version=20, dynamo=True)
        out["onnxruntime float32"] = _ort_session(onnx_path, threads)
    except Exception as exc:
        out["onnxruntime float32"] = f"failed: {type(exc).__name__}: {exc}"[:300]
        return out
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter([{"moving": m.numpy(), "fixed": f.numpy()} for m, f in calibration])

            def get_next(self):
                return next(self.items, None)

        prepared = workdir / "model_prep.onnx"
        quant_pre_process(str(onnx_path), str(prepared))
        int8_path = workdir / "model_int8.onnx"
        # only the convolutions: the field arithmetic and the affine head stay float32
        quantize_static(str(prepared), str(int8_path), Reader(), op_types_to_quantize=["Conv"],
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
        out["onnxruntime int8 (static, convolutions)"] = _ort_session(int8_path, threads)
    except Exception as exc:
        out["onnxruntime int8 (static, convolutions)"] = f"failed: {type(exc).__name__}: {exc}"[:300]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("results", type=Path)
    ap.add_argument("out_csv", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--calibration_pairs", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    subjects = pd.read_csv(args.results / "data" / "subjects.csv")
    pairs = pd.read_csv(args.results / "data" / "pairs.csv")
    train = pairs[pairs.split == "train"].head(args.calibration_pairs)
    images = load_images(subjects[subjects.id.isin(set(train.moving) | set(train.fixed))])
    calibration = [(images[r.moving], images[r.fixed]) for r in train.itertuples()]
    test = pairs[pairs.split == "test"]
    spacing = load_model(args.model)[1].spacing_mm
    rows = []
    reference = FieldOnly(load_model(args.model)[0]).eval()
    subj = subjects.set_index("id")
    test_inputs = {r.pair_id: tuple(load_images(subj.loc[[r.moving, r.fixed]].reset_index()).values())
                   for r in test.itertuples()}
    with torch.inference_mode():
        ref_fields = {k: reference(m, f) for k, (m, f) in test_inputs.items()}
        per_pair, _ = evaluate_pairs("float32", lambda a, b: reference(a, b).float(), subjects, test, spacing,
                                     with_hd95=False, show_progress=False)
    ref_dice = summary(per_pair)["dice"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, predict in engines(args.model, calibration, args.threads, Path(tmp)).items():
            row = {"engine": name, "model": args.model.stem, "threads": args.threads, "cpu": cpu_summary(),
                   "torch": torch.__version__, "float32_test_dice": ref_dice}
            if isinstance(predict, str):
                rows.append({**row, "note": predict})
                print(rows[-1], flush=True)
                continue
            m, f = calibration[0]
            with torch.inference_mode():
                for _ in range(3):
                    predict(m, f)
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    predict(m, f)
                    times.append(time.perf_counter() - t)
                diffs = [(predict(m, f).float() - ref_fields[k]).abs() for k, (m, f) in test_inputs.items()]
            rows.append({**row, "network_s_median": statistics.median(times), "network_s_min": min(times),
                         "field_max_diff_voxels": float(max(d.max() for d in diffs)),
                         "field_mean_diff_voxels": float(sum(d.mean() for d in diffs) / len(diffs)),
                         "repeats": args.repeats, "note": ""})
            print({k: rows[-1].get(k) for k in ("engine", "network_s_median", "field_max_diff_voxels")}, flush=True)
    write_csv(pd.DataFrame(rows), args.out_csv)


if __name__ == "__main__":
    main()
