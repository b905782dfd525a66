"""The model zoo (specs/models/): each spec builds, with the canonical names and shapes of the
state_dict of the PyTorch module it stands for and that module's parameter count."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "specs" / "models"


def torchvision_resnet_state_dict(block: str, layers: list[int], classes: int = 1000) -> dict:
    """The keys and shapes of ``torchvision.models.ResNet(block, layers).state_dict()``, written
    as torchvision's resnet.py builds the modules: ``_make_layer`` gives a block a downsample
    (conv1x1(inplanes, planes * expansion, stride), BatchNorm2d) when ``stride != 1 or
    self.inplanes != planes * block.expansion``; BasicBlock (expansion 1) registers conv1 (3x3,
    stride), bn1, conv2 (3x3), bn2, downsample; Bottleneck (expansion 4, ResNet v1.5) conv1
    (1x1), bn1, conv2 (3x3, stride), bn2, conv3 (1x1), bn3, downsample. Every BatchNorm2d's
    state_dict holds weight, bias, running_mean, running_var and num_batches_tracked (a
    0-dimensional int64)."""
    keys: dict[str, tuple] = {}

    def bn(prefix, n):
        keys.update({f"{prefix}.weight": (n,), f"{prefix}.bias": (n,),
                     f"{prefix}.running_mean": (n,), f"{prefix}.running_var": (n,),
                     f"{prefix}.num_batches_tracked": ()})

    expansion = {"BasicBlock": 1, "Bottleneck": 4}[block]
    keys["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for i, blocks in enumerate(layers):
        planes, stride = 64 * 2 ** i, 1 if i == 0 else 2
        for j in range(blocks):
            p, s = f"layer{i + 1}.{j}", stride if j == 0 else 1
            if block == "BasicBlock":
                keys[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                bn(f"{p}.bn1", planes)
                keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
            else:
                keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.bn1", planes)
                keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
                keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
                bn(f"{p}.bn3", planes * 4)
            if s != 1 or inplanes != planes * expansion:
                keys[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    keys["fc.weight"] = (classes, 512 * expansion)
    keys["fc.bias"] = (classes,)
    return keys


#: torch 2's nn.TransformerEncoderLayer(768, 12, 3072, 0.1, "gelu", batch_first=True)
#: .state_dict(), keys and shapes as that module printed them (in the torch backend's env)
TRANSFORMER_ENCODER_LAYER = {
    "self_attn.in_proj_weight": (2304, 768), "self_attn.in_proj_bias": (2304,),
    "self_attn.out_proj.weight": (768, 768), "self_attn.out_proj.bias": (768,),
    "linear1.weight": (3072, 768), "linear1.bias": (3072,),
    "linear2.weight": (768, 3072), "linear2.bias": (768,),
    "norm1.weight": (768,), "norm1.bias": (768,), "norm2.weight": (768,), "norm2.bias": (768,)}

#: nanoGPT's Block at GPT-2 small sizes, c_attn / attn.c_proj as nn.MultiheadAttention holds them
GPT_BLOCK = {
    "ln_1.weight": (768,), "ln_1.bias": (768,),
    "attn.in_proj_weight": (2304, 768), "attn.in_proj_bias": (2304,),
    "attn.out_proj.weight": (768, 768), "attn.out_proj.bias": (768,),
    "ln_2.weight": (768,), "ln_2.bias": (768,),
    "mlp.c_fc.weight": (3072, 768), "mlp.c_fc.bias": (3072,),
    "mlp.c_proj.weight": (768, 3072), "mlp.c_proj.bias": (768,)}

RESNET18 = torchvision_resnet_state_dict("BasicBlock", [2, 2, 2, 2])
RESNET50 = torchvision_resnet_state_dict("Bottleneck", [3, 4, 6, 3])

#: file -> (the module's state_dict keys and shapes, its trainable parameter count)
ZOO = {
    "resnet18.yaml": (RESNET18, 11_689_512),
    "resnet50.yaml": (RESNET50, 25_557_032),
    "transformer_encoder_layer.yaml": (TRANSFORMER_ENCODER_LAYER, 7_087_872),
    "gpt_block.yaml": (GPT_BLOCK, 7_087_872),
}


def test_torchvision_key_lists_are_torchvision_sized():
    """The written-out torchvision state_dicts have torchvision's key counts (122 and 320) and
    its well-known corners: resnet18's layer1 has no downsample, resnet50's does (64 -> 256)."""
    assert (len(RESNET18), len(RESNET50)) == (122, 320)
    assert "layer1.0.downsample.0.weight" not in RESNET18
    assert RESNET18["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert RESNET18["layer4.1.conv2.weight"] == (512, 512, 3, 3)
    assert RESNET50["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert RESNET50["layer2.0.conv2.weight"] == (128, 128, 3, 3)   # v1.5: the stride here
    assert RESNET50["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert RESNET50["fc.weight"] == (1000, 2048)


@pytest.mark.parametrize("file", sorted(ZOO))
def test_zoo_spec_has_the_modules_state_dict_names_and_count(file):
    """Canonical names and shapes are the module's state_dict but for BatchNorm's
    num_batches_tracked (a step counter the spec does not model); running statistics are
    there and not trainable; the trainable count is the module's."""
    expected, count = ZOO[file]
    spec = load_spec(MODELS / file)
    got = {p.name: tuple(p.shape) for p in spec.params}
    assert got == {k: v for k, v in expected.items()
                   if not k.endswith(".num_batches_tracked")}
    assert spec.param_count == count
    assert {p.name for p in spec.params if not p.trainable} == \
        {k for k in expected if k.endswith((".running_mean", ".running_var"))}


@pytest.mark.parametrize("file, out", [("resnet18.yaml", (2, 1000)), ("resnet50.yaml", (1, 1000)),
                                       ("transformer_encoder_layer.yaml", (2, 8, 768)),
                                       ("gpt_block.yaml", (2, 8, 768))])
def test_zoo_spec_output_shape(file, out):
    assert load_spec(MODELS / file).output_shape == out


def test_zoo_specs_are_in_this_test():
    """Every spec in specs/models/ but the recurrent one is checked here."""
    assert {p.name for p in MODELS.glob("*.yaml")} - {"lstm_lm.yaml"} == set(ZOO)


def test_harness_check_accepts_the_zoo():
    proc = subprocess.run([sys.executable, "-m", "harness", "check",
                           *sorted(str(p) for p in MODELS.glob("*.yaml"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(list(MODELS.glob("*.yaml")))
    assert all(line.startswith("ok ") for line in lines), proc.stdout
