"""init_by_type and the module walk, on a real NumPy worker's record of lesson_002: the checks
that hold each walk to the spec (and fail when it reached other parameters), and the spec page's
module tree section."""

from __future__ import annotations

import copy

import pytest
from unit_helpers import PYTHON, SPECS_DIR, quiet

from backends import protocol
from harness import analysis, spec_pages
from harness.runner import run_worker
from harness.spec import load_spec


# ------------------------------------------------------------------ module walk, init_by_type

@pytest.fixture(scope="module")
def lesson_002(tmp_path_factory):
    """lesson_002 (three blocks of dense + relu, init_by_type) through a real NumPy worker."""
    spec = load_spec(SPECS_DIR / "lesson_002.yaml")
    result = run_worker("numpy", PYTHON, [spec], tmp_path_factory.mktemp("lesson"),
                        device="cpu", timeout=60, progress=quiet)
    return spec, result.records[0], result.arrays[0]


def _analyzed(lesson, defaults, edit=None):
    spec, rec, arrays = lesson
    rec = copy.deepcopy(rec)
    if edit:
        edit(rec)
    return analysis.analyze(spec, defaults, "numpy", rec, arrays, None)


def test_init_by_type_reaches_every_dense_layer_and_is_checked(lesson_002, numpy_defaults):
    """The reference's walk reached the six dense parameters; their values pass their
    distribution checks (normal(0, 0.01), zeros) like any initializer's."""
    result = _analyzed(lesson_002, numpy_defaults)
    check = result.check(analysis.INIT_BY_TYPE, "dense")
    assert check.passed and "issubclass(LAYERS[node.type], _Dense)" in check.detail
    assert result.passed and len(result.params) == 6
    assert all("(init_by_type.dense, by the framework's walk)" in p.record.init_impl
               for p in result.params)


@pytest.mark.parametrize("edit, observed", [
    (lambda rec: rec.init_by_type[0].reached.remove("1.0.weight"), ["1.0.weight"]),
    (lambda rec: rec.init_by_type[0].reached.append("1.1.weight"), ["1.1.weight"]),
    (lambda rec: rec.init_by_type.clear(), "no record"),
])
def test_init_by_type_check_fails_when_the_walk_reached_other_parameters(
        lesson_002, numpy_defaults, edit, observed):
    check = _analyzed(lesson_002, numpy_defaults, edit).check(analysis.INIT_BY_TYPE, "dense")
    assert not check.passed and check.observed == observed


def test_init_by_type_for_a_type_the_spec_does_not_name_fails(lesson_002, numpy_defaults):
    def extra(rec):
        rec.init_by_type.append(protocol.InitByTypeRecord("conv2d", "a walk", ["x.weight"]))
    check = _analyzed(lesson_002, numpy_defaults, extra).check(analysis.INIT_BY_TYPE, "conv2d")
    assert check is not None and not check.passed


def test_module_walk_check(lesson_002, numpy_defaults):
    """Children are among the modules; a child the recursive walk lacks, or no walk, fails."""
    walk = _analyzed(lesson_002, numpy_defaults).check(analysis.MODULE_WALK)
    assert walk.passed
    lone = _analyzed(lesson_002, numpy_defaults, lambda rec: rec.walk.children.append(
        protocol.ModuleEntry("9", "sequential", 99))).check(analysis.MODULE_WALK)
    assert not lone.passed and lone.observed == ["9 (sequential)"]
    shared = _analyzed(lesson_002, numpy_defaults, lambda rec: rec.walk.children.append(
        protocol.ModuleEntry("again", "sequential", rec.walk.modules[1].obj)))
    assert shared.check(analysis.MODULE_WALK).passed  # one object under another name
    none = _analyzed(lesson_002, numpy_defaults,
                     lambda rec: setattr(rec, "walk", None)).check(analysis.MODULE_WALK)
    assert not none.passed


def test_spec_page_shows_children_against_modules_and_the_init_idiom(lesson_002,
                                                                     numpy_defaults):
    spec = lesson_002[0]
    status, section = spec_pages.module_tree(None, spec, [_analyzed(lesson_002, numpy_defaults)])
    assert status == spec_pages.DIFFERS and section.title.startswith("Module tree")
    counts, entries, _, by_type = section.blocks
    assert counts.rows == [["numpy", "plan.layers (the top-level nodes)", "3",
                            "iter_nodes(plan.layers) (the plan as '', then every node, depth "
                            "first)", "10"]]
    assert entries.rows[0][1] == "0: sequential, 1: sequential, 2: sequential"
    assert by_type.rows == [["numpy", "dense", "for node in iter_nodes(plan): if issubclass("
                             "LAYERS[node.type], _Dense): draw its parameters", "6", "pass"]]
