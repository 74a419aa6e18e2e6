"""One rule decides which inference engines this CPU runs natively (issue 11): forced both ways."""
import math

import pytest

from ldreg import engines
from ldreg.speed_profile import ON_GRID, input_label, machine_throughput, plan

ALL = ["float32", "float32_cl", "bfloat16_cl"]


@pytest.fixture
def no_bf16_units(monkeypatch):
    monkeypatch.setenv(engines.FORCE_BF16_ENV, "0")


@pytest.fixture
def bf16_units(monkeypatch):
    monkeypatch.setenv(engines.FORCE_BF16_ENV, "1")


def test_without_bf16_units_bfloat16_is_skipped_everywhere(no_bf16_units):
    kept, skipped = engines.native_engines(ALL)
    assert kept == ["float32", "float32_cl"] and list(skipped) == ["bfloat16_cl"]
    assert "emulated" in skipped["bfloat16_cl"]
    assert engines.default_precision("cpu") == "float32"
    configs, notes = plan(["teacher", "student"], ALL, [(16, 16, 16)], [1, 2])
    assert {e for _, e, _, _, _ in configs} == {"float32", "float32_cl"} and len(configs) == 2 * 2 * 2
    assert all(native is None for *_, native in configs)
    scan = {"shape": [40, 48, 40], "spacing_mm": 1.0}
    with_scan, _ = plan(["student"], ["float32"], [(16, 16, 16), (32, 32, 32)], [1], [scan])
    # each grid with inputs on it, then the scan on the first (the model's own) grid
    assert with_scan == [("student", "float32", (16, 16, 16), 1, None), ("student", "float32", (32, 32, 32), 1, None),
                         ("student", "float32", (16, 16, 16), 1, scan)]
    assert input_label(scan) == "40x48x40 at 1 mm" and input_label(None) == ON_GRID
    assert [(n["model"], n["engine"]) for n in notes] == [("teacher", "bfloat16_cl"), ("student", "bfloat16_cl")]
    assert all("emulated" in n["accuracy_note"] for n in notes)
    assert "no bf16 units" in engines.cpu_summary()


def test_without_bf16_units_machine_throughput_runs_no_bfloat16(no_bf16_units):
    rows = machine_throughput(1, repeats=1, channels=4, size=8, matmul=32)
    bf16 = [r for r in rows if r["dtype"] == "bfloat16"]
    assert len(bf16) == 2 and all(math.isnan(r["gflops_per_s"]) and "emulated" in r["note"] for r in bf16)
    assert all(r["gflops_per_s"] > 0 for r in rows if r["dtype"] == "float32")


def test_with_bf16_units_every_engine_runs(bf16_units):
    kept, skipped = engines.native_engines(ALL)
    assert kept == ALL and skipped == {}
    assert engines.default_precision("cpu") == "bfloat16" and engines.default_precision("cuda") == "float32"
    configs, notes = plan(["student"], ALL, [(16, 16, 16)], [1])
    assert len(configs) == 3 and notes == []
    rows = machine_throughput(1, repeats=1, channels=4, size=8, matmul=32)
    assert all(r["gflops_per_s"] > 0 and r["note"] == "" for r in rows)
    assert "bf16 units" in engines.cpu_summary() and "no bf16 units" not in engines.cpu_summary()


def test_a_bad_override_and_an_unknown_engine_are_refused(monkeypatch):
    monkeypatch.setenv(engines.FORCE_BF16_ENV, "yes")
    with pytest.raises(ValueError, match="LDREG_BF16_UNITS must be 0 or 1"):
        engines.bf16_units()
    monkeypatch.delenv(engines.FORCE_BF16_ENV)
    with pytest.raises(ValueError, match="unknown inference engine 'int4'"):
        engines.native_engines(["int4"])


def test_the_real_answer_follows_proc_cpuinfo(monkeypatch):
    monkeypatch.delenv(engines.FORCE_BF16_ENV, raising=False)
    flags = engines._cpuinfo()[1]
    assert engines.bf16_units() == bool({"amx_bf16", "avx512_bf16"} & flags)
    assert engines.cpu_features()["avx2"] == ("avx2" in flags)


def test_a_onednn_isa_cap_below_bf16_means_bf16_is_emulated(monkeypatch):
    monkeypatch.delenv(engines.FORCE_BF16_ENV, raising=False)
    monkeypatch.setattr(engines, "_cpuinfo", lambda: ("a bf16 CPU", frozenset({"avx2", "avx512f", "avx512_bf16"})))
    monkeypatch.delenv(engines.ONEDNN_ISA_ENV, raising=False)
    assert engines.bf16_units() and engines.precision_native("bfloat16")
    monkeypatch.setenv(engines.ONEDNN_ISA_ENV, "avx2")
    assert not engines.bf16_units() and not engines.precision_native("bfloat16")
    assert engines.native_engines(["float32", "bfloat16_cl"])[0] == ["float32"]
    assert "no bf16 units" in engines.cpu_summary() and "oneDNN held to avx2" in engines.cpu_summary()
    monkeypatch.setenv(engines.ONEDNN_ISA_ENV, "AVX512_CORE_AMX")  # a cap above bf16 takes nothing away
    assert engines.bf16_units()
    monkeypatch.setenv(engines.FORCE_BF16_ENV, "1")  # the explicit override still wins
    monkeypatch.setenv(engines.ONEDNN_ISA_ENV, "AVX2")
    assert engines.bf16_units()
