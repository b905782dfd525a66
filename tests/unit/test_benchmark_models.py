"""benchmarks/models.py's plumbing (no timing): its arguments, the models at the CPU sizes or
the GPU anchors', and the ratio table shared with benchmarks/timing_fidelity.py, built from
fidelity records."""

from __future__ import annotations

import pytest

from benchmarks import models
from benchmarks.timing_fidelity import FidelityRun, table
from harness.spec import build_spec


def test_models_at_cpu_sizes_and_at_the_gpu_anchors():
    cpu, gpu = models.documents(["resnet50", "encoder"], False), \
        models.documents(["resnet50", "encoder"], True)
    assert cpu["resnet50"]["input"] == [1, 3, 64, 64] and cpu["encoder"]["input"] == [2, 8, 768]
    assert gpu["resnet50"]["input"] == [64, 3, 224, 224]
    assert gpu["encoder"]["input"] == [32, 128, 768]
    resnet = build_spec(gpu["resnet50"], "resnet50.yaml")   # the zoo's model, at the anchor
    assert resnet.param_count == 25_557_032 and resnet.output_shape == (64, 1000)
    assert build_spec(cpu["encoder"], "encoder.yaml").param_count == 7_087_872


def test_arguments(capsys):
    args = models.parse(["--models", "encoder", "--backend", "flax", "--gpu"])
    assert args.models == ["encoder"] and args.backend == ["flax"] and args.gpu
    assert models.parse([]).models == ["resnet50", "encoder"]
    assert models.parse([]).phases == ["inference", "train"]
    assert models.parse(["--phases", "train"]).phases == ["train"]
    for bad in (["--models", "vgg"], ["--models", ","], ["--backend", "tensorflow"],
                ["--phases", "backward"], ["--phases", ","]):
        with pytest.raises(SystemExit) as exit_:
            models.parse(bad)
        assert exit_.value.code == 2
    assert "choose from resnet50, encoder" in capsys.readouterr().err


def test_ratio_table_from_fidelity_records():
    rows = [{"model": "encoder", "mode": "eager", "tool": "torch.utils.benchmark",
             "harness": [2e-3] * 8 + [3e-3] * 2, "reference": [1e-3] * 10},
            {"model": "encoder", "phase": "inference", "mode": "compiled",
             "error": "RuntimeError: no"},
            {"model": "encoder", "phase": "train", "mode": "eager", "tool": "torch.utils.benchmark",
             "harness": [4e-3] * 10, "reference": [4.1e-3] * 10}]
    lines, ratios = table([FidelityRun("torch", {}, rows),
                           FidelityRun("gluon", error="exit status 1: ImportError")], width=7)
    assert ratios == pytest.approx([2.0, 4 / 4.1])
    assert lines[2].split()[:7] == ["torch", "encoder", "inference", "eager", "2.000", "1.000",
                                    "2.000"]
    assert lines[2].split()[7:9] == ["0.0%", "0.0%"]
    assert lines[3].split()[4:] == ["error:", "RuntimeError:", "no"]
    assert lines[4].split()[:7] == ["torch", "encoder", "train", "eager", "4.000", "4.100",
                                    "0.976"]
    assert lines[5] == "gluon: failed (exit status 1: ImportError)"
    assert lines[-1].strip() == "1/2 ratios within 5 %; largest deviation 100.0%"
