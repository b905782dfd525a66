"""benchmarks/random_specs.py: its specs are valid by construction (the harness's own loader
accepts every one), reproducible from the seed, and cover every layer type of the registry."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from backends import layers
from harness.spec import build_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import random_specs  # noqa: E402


def test_every_generated_spec_is_valid_and_the_seed_reproduces_it():
    docs = random_specs.generate(seed=5, count=40)
    for doc in docs:
        build_spec(doc, f"{doc['name']}.yaml")   # a SpecError fails the test with its line
    assert docs == random_specs.generate(seed=5, count=40)
    assert docs != random_specs.generate(seed=6, count=40)


def test_the_specs_cover_every_layer_type_and_the_structure():
    used = set()

    def walk(node):
        used.add(node["type"])
        for child in node.get("layers", []):
            walk(child)
        if "shortcut" in node:
            walk(node["shortcut"])

    for doc in random_specs.generate(seed=0, count=60):
        for node in doc["layers"]:
            walk(node)
    assert used == set(layers.NODE_TYPES), set(layers.NODE_TYPES) - used


def test_the_command_writes_one_file_per_spec(tmp_path, capsys):
    assert random_specs.main(["--seed", "3", "--count", "4", "--out", str(tmp_path)]) == 0
    files = sorted(tmp_path.glob("*.yaml"))
    assert [f.name for f in files] == [f"random_{3000 + i:04d}.yaml" for i in range(4)]
    assert yaml.safe_load(files[0].read_text()) == random_specs.generate(3, 4)[0]
