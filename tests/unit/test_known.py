"""Known framework limitations and defects (harness/known.py): declared in backend.yaml with a
reason and a source, matched exactly, strict; a defect only explains a count of out-of-support
values its rate can explain; a malformed declaration is one line naming the field."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from backends.protocol import ParamRecord, SpecRecord, Status
from harness import analysis, envs, known
from harness.stats import BOUNDS, Check

LIMIT = known.Limitation("kt", "small_cnn", analysis.COMPILED, None, "cannot compile it",
                         "dynamo's recompile limit", "keras/src/backend/torch/layer.py:40")


def result(spec="small_cnn", backend="kt", compiled=(False, False)) -> analysis.Result:
    r = analysis.Result(backend, SpecRecord(spec, Status.OK))
    for phase, ok in zip(("inference", "train"), compiled):
        r.checks.append(Check(analysis.COMPILED, ok, "x", "y", "", f"compiled {phase} batch 4"))
    r.checks.append(Check(analysis.NUMERICS, True, 0.0, 1e-5))
    return r


def test_a_declared_limitation_is_a_finding_not_a_failure():
    r = result()
    assert not r.passed
    known.apply([r], {"kt": (LIMIT,)}, {})
    assert r.passed and r.failures() == []
    assert [c.subject for _, c in r.known_failures()] == ["compiled inference batch 4",
                                                          "compiled train batch 4"]
    assert all("known limitation of kt: cannot compile it" in c.known
               for _, c in r.known_failures())
    assert r.to_json()["checks"][0]["known"].startswith("known limitation of kt")


def test_a_limitation_is_strict_and_exact():
    """A matched check that passes fails the run (the declaration is stale); another spec,
    backend or check is never matched."""
    r = result(compiled=(True, False))
    known.apply([r], {"kt": (LIMIT,)}, {})
    assert not r.passed
    stale = r.checks_named(known.STILL_HAPPENS)
    assert [c.subject for c in stale] == ["compiled inference batch 4_compiled mode compiled "
                                          "on small_cnn"]
    assert "no longer happens; remove the declaration" in stale[0].detail
    other_spec, other_backend = result(spec="tied"), result(backend="keras")
    known.apply([other_spec, other_backend], {"kt": (LIMIT,)}, {})
    assert not other_spec.passed and not other_backend.passed


def test_a_limitation_for_some_subjects_only():
    lim = known.Limitation("kt", "small_cnn", analysis.COMPILED, ("compiled train batch 4",),
                           "w", "r", "s")
    r = result()
    known.apply([r], {"kt": (lim,)}, {})
    assert not r.passed and [c.subject for c in r.checks if not c.holds] == \
        ["compiled inference batch 4"]
    assert known.exercised([r], lim) and not known.exercised([result(spec="x")], lim)


DEFECT = known.Defect("kt", BOUNDS, r"keras\.initializers\.(TruncatedNormal|VarianceScaling"
                      r"\(.*distribution=truncated_normal)", 4.29e-6,
                      "keeps an out-of-range draw", "keras/src/backend/torch/random.py:113")


def param(outside: int, n: int = 131072, impl="native: keras.initializers.VarianceScaling("
          "scale=1, mode=fan_in, distribution=truncated_normal)") -> analysis.ParamResult:
    spec = type("P", (), {"name": "w"})()
    rec = ParamRecord("w", "weight", "k", [n], [n], "float32", True, init_impl=impl)
    check = Check(BOUNDS, outside == 0, [-0.2, 0.2], [-0.1, 0.1],
                  f"{outside} of {n} values outside the support")
    return analysis.ParamResult(spec, rec, {"name": "variance_scaling"}, None,
                                {"n": n, "outside_support": outside}, [check])


@pytest.mark.parametrize("outside, n, impl, explained", [
    (1, 131072, None, True),         # about 0.56 expected: one is the defect
    (3, 131072, None, True),         # P(X >= 3) = 0.018: still the defect
    (40, 131072, None, False),       # P(X >= 40) ~ 1e-60: something else is wrong
    (1, 131072, "custom: TorchTruncatedNormal", False),   # another realization
])
def test_a_defect_explains_only_what_its_rate_can(outside, n, impl, explained):
    p = param(outside, n) if impl is None else param(outside, n, impl)
    r = analysis.Result("kt", SpecRecord("init_catalogue", Status.OK), params=[p])
    known.apply([r], {}, {"kt": (DEFECT,)})
    assert r.passed == explained
    if explained:
        assert "known defect of kt" in p.checks[0].known and "expected at" in p.checks[0].known
    elif impl is None:
        assert "more than" in p.checks[0].detail  # says why the defect does not explain it


def test_poisson_tail():
    assert known.poisson_tail(0, 0.5) == 1.0
    assert known.poisson_tail(1, 0.5) == pytest.approx(1 - math.exp(-0.5))
    assert known.poisson_tail(3, 0.5) == pytest.approx(1 - math.exp(-0.5) * (1 + 0.5 + 0.125))


def test_keras_torch_declares_its_limitation_and_defect():
    """The shipped declarations read, name their source, and the defect's pattern matches how
    the Keras adapter describes its truncated normals."""
    kt = envs.discover()["keras_torch"]
    assert [(lim.spec, lim.check, lim.subjects) for lim in kt.limitations] == [
        ("small_cnn", analysis.COMPILED, None), ("resnet_block", analysis.COMPILED, None),
        ("resnet50", analysis.COMPILED, None)]
    assert all("recompile_limit" in lim.reason and "keras/src" in lim.source
               for lim in kt.limitations)
    (defect,) = kt.defects
    assert defect.rate_per_value == pytest.approx(0.0455 ** 4, rel=0.02)
    assert "keras/src/backend/torch/random.py" in defect.source
    assert envs.discover()["keras"].limitations == ()


@pytest.mark.parametrize("entry, field", [
    ({"known_limitations": {"spec": "x"}}, "known_limitations: a list"),
    ({"known_limitations": [{"spec": "x", "check": "c", "what": "w", "reason": "r"}]},
     "known_limitations[0].source: a non-empty string"),
    ({"known_limitations": [{"spec": "x", "check": "c", "what": "w", "reason": "r",
                             "source": "s", "when": 1}]}, "known_limitations[0].when: unknown"),
    ({"known_limitations": [{"spec": "x", "check": "c", "what": "w", "reason": "r",
                             "source": "s", "subjects": []}]}, "known_limitations[0].subjects"),
    ({"known_defects": [{"check": "bounds", "realized_as": "(", "rate_per_value": 0.1,
                         "what": "w", "source": "s"}]}, "known_defects[0].realized_as"),
    ({"known_defects": [{"check": "bounds", "realized_as": "x", "rate_per_value": 2,
                         "what": "w", "source": "s"}]}, "known_defects[0].rate_per_value"),
    ({"known_defects": [{"check": "mean", "realized_as": "x", "rate_per_value": 0.1,
                         "what": "w", "source": "s"}]}, "known_defects[0].check"),
])
def test_a_malformed_declaration_is_one_line_naming_the_field(tmp_path, monkeypatch, entry,
                                                               field):
    folder = tmp_path / "backends" / "b"
    folder.mkdir(parents=True)
    (folder / "adapter.py").write_text("")
    (folder / "backend.yaml").write_text(yaml.safe_dump({"framework": "B", **entry}))
    monkeypatch.setattr(envs, "BACKENDS_DIR", tmp_path / "backends")
    with pytest.raises(envs.UserError) as err:
        envs.discover()
    assert "backend.yaml: " + field in str(err.value) and "\n" not in str(err.value)


def test_bounds_check_counts_values_outside():
    """The bounds check and the parameter's statistics count the values outside the support
    (what a defect's rate is tested against)."""
    from harness import stats
    v = np.array([0.0, 0.05, -0.2, 0.3])
    (check,) = [c for c in stats.continuous_checks(v, stats.scipy_stats().uniform(-0.1, 0.2),
                                                   (-0.1, 0.1)) if c.name == BOUNDS]
    assert not check.passed and check.detail == "2 of 4 values outside the support"
    assert stats.outside_support(v, -0.1, 0.1) == 2


def test_limitations_sharing_their_words_each_show_their_own_spec():
    """keras_torch declares one 'what' for small_cnn, resnet_block and resnet50: the finding of
    each names only the checks of its own spec (not every check with the same note)."""
    from types import SimpleNamespace

    from harness.findings import known_limitations

    other = known.Limitation("kt", "resnet50", analysis.COMPILED, None, LIMIT.what,
                             LIMIT.reason, LIMIT.source)
    results = [result(), result(spec="resnet50", compiled=(False, True))]
    known.apply(results, {"kt": (LIMIT, other)}, {})
    sections = known_limitations(SimpleNamespace(limitations={"kt": (LIMIT, other)},
                                                 results=results))
    assert [s.summary[0] for s in sections] == ["kt: cannot compile it (2 checks on ",
                                                "kt: cannot compile it (1 check on "]
    assert [s.summary[1].text for s in sections] == ["small_cnn", "resnet50"]
