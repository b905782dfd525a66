"""The markdown report and results.json, rendered from real worker records the way the CLI does
(run_worker -> analysis.analyze -> report.results_document / report.render / write_run), and
reports/latest handling."""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
from unit_helpers import PYTHON, ROOT, SPECS_DIR, dense_spec, quiet

from backends.protocol import failed_record
from harness import analysis, cli, report, rundir
from harness.runner import BackendRun, run_worker
from harness.spec import load_spec

RUN = {"id": "test-run", "started": "2026-01-01 00:00:00 UTC", "device": "cpu",
       "command": "python -m harness compare (unit test)", "seed_note": "from each spec"}


def render(specs, records, environments, defaults) -> dict[str, str]:
    """Every page, markdown and HTML, by file name."""
    return report.render(report.Context(RUN, specs, records, environments, defaults))


def section(markdown, title):
    """The text of one '## title' section, up to the next '## '."""
    return markdown.split(f'"></a>{title}\n', 1)[1].split("\n## ", 1)[0]


def analyzed(numpy_run, defaults, names, corrupt=None):
    """Analyzed records (backend numpy) of the session run, optionally corrupting arrays."""
    specs, records = [], []
    for name in names:
        spec, rec, arrays = numpy_run[name]
        if corrupt:
            corrupt(name, arrays)
        records.append(analysis.analyze(spec, defaults, "numpy", rec, arrays, None))
        specs.append(spec)
    return specs, records


def numpy_env(numpy_session_run):
    _, result = numpy_session_run
    return {"numpy": BackendRun(interpreter=str(PYTHON), worker=result.environment,
                                wall_s=result.wall_s, log="logs/numpy.log")}


def test_clean_run_report(numpy_run, numpy_session_run, numpy_defaults):
    """Records that pass give a report with no failures and a passing verdict."""
    specs, records = analyzed(numpy_run, numpy_defaults, ["lazy_mlp", "tied"])
    pages = render(specs, records, numpy_env(numpy_session_run), {"numpy": numpy_defaults})
    md = pages["report.md"]
    assert "**Verdict: pass.**" in md
    assert "None: every backend ran every spec" in section(md, "Failures")
    assert "| numpy | 2/2 |" in md
    tied = pages["specs/tied.md"]
    assert "`shared.weight`" in tied and "| 4.weight |" in tied


def test_failed_check_is_listed_with_its_parameter(numpy_run, numpy_session_run,
                                                   numpy_defaults):
    """A parameter failing its value checks appears under Failures by name and check, and
    its spec page shows the failed section first, unfolded, the rest folded."""
    def widen(name, arrays):
        if name == "layout":  # fan_out instead of fan_in: sqrt(2) too wide
            arrays["param/0.weight"] = (arrays["param/0.weight"] * math.sqrt(2)).astype(
                np.float32)

    specs, records = analyzed(numpy_run, numpy_defaults, ["lazy_mlp", "layout"], widen)
    pages = render(specs, records, numpy_env(numpy_session_run), {"numpy": numpy_defaults})
    md = pages["report.md"]
    failures = section(md, "Failures")
    assert "**numpy** / [layout](specs/layout.md#failures): 3 checks failed" in failures
    assert "0.weight bounds" in failures and "0.weight std" in failures
    assert "lazy_mlp" not in failures and "0.bias" not in failures
    assert "**Verdict: FAILURES.**" in md
    assert "| numpy | 2/2 |" in md and "**FAIL**" in md
    layout = pages["specs/layout.md"]
    first = layout.index('<a id="failures"></a>Failures')
    assert first < layout.index('<a id="initial-values"></a>Initial values') < \
        layout.index('<details id="shapes">')
    assert "**FAIL: std (" in layout and "; bounds (" in layout
    assert '<details id="initial-values-passed">' in layout


def test_failed_backend_record_shows_error_and_log_tail(tmp_path, numpy_defaults):
    """A crashed worker's records show their error under Failures and the log tail on the
    spec's page."""
    specs = [dense_spec("first"), dense_spec("crash")]
    result = run_worker("fake", PYTHON, specs, tmp_path, device="cpu", timeout=60,
                        progress=quiet, adapter="tests.fakes.adapter")
    records = []
    for spec, rec, arrays in zip(specs, result.records, result.arrays):
        records.append(analysis.analyze(spec, numpy_defaults, "fake", rec, arrays, None))
    env = {"fake": BackendRun(interpreter=str(PYTHON), worker=result.environment,
                              wall_s=result.wall_s, error="; ".join(result.errors))}
    pages = render(specs, records, env, {"fake": numpy_defaults})
    failures = section(pages["report.md"], "Failures")
    assert "**fake** / [crash](specs/crash.md#failures): failed: worker exited with status 7" \
        in failures
    assert "fake / first" not in failures and "[first]" not in failures
    crash = pages["specs/crash.md"]
    assert "crashing now" in crash and "```" in crash
    assert "| fake | 1/2 |" in pages["report.md"]


def test_backend_that_never_started_shows_why(numpy_defaults):
    """A backend with no worker environment shows its error in the Environments table."""
    spec = dense_spec("a")
    rec = analysis.analyze(spec, numpy_defaults, "x",
                           failed_record("a", "ImportError: no fakeframework",
                                         log_tail="line one\nline two"), {}, None)
    env = {"x": BackendRun(interpreter="/opt/x/bin/python",
                           error="ImportError: no fakeframework")}
    pages = render([spec], [rec], env, {"x": numpy_defaults})
    environments = section(pages["run.md"], "Environments")
    assert "/opt/x/bin/python" in environments and "ImportError: no fakeframework" in environments
    failures = section(pages["report.md"], "Failures")
    assert "**x** / [a](specs/a.md#failures): failed: ImportError: no fakeframework" in failures
    assert "line one\nline two" in pages["specs/a.md"]


def test_results_document(numpy_run, numpy_session_run, numpy_defaults):
    """results_document carries schema_version, run, environments, specs and the records."""
    specs, records = analyzed(numpy_run, numpy_defaults, ["tied"])
    envs = numpy_env(numpy_session_run)
    doc = report.results_document(RUN, specs, records, envs)
    assert doc["schema_version"] == report.RESULTS_SCHEMA_VERSION == 4
    assert doc["machines"] == {}  # none given: a report rendered outside a run
    assert doc["run"] == RUN
    assert doc["environments"] == {"numpy": envs["numpy"].to_json()}
    assert doc["environments"]["numpy"]["worker"]["backend"] == "numpy"
    assert doc["specs"] == [{"name": "tied", "file": specs[0].file, "input_shape": [2, 20],
                             "output_shape": [2, 1], "param_count": 249,
                             "flops_per_sample": specs[0].flops_per_sample}]
    assert doc["results"] == [r.to_json() for r in records]
    json.dumps(doc, default=float)


def test_write_atomic_leaves_no_tmp_file(tmp_path):
    """write_atomic replaces the file's content and leaves no temporary file behind."""
    target = tmp_path / "report.md"
    report.write_atomic(target, "first")
    report.write_atomic(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_write_run_writes_every_page(tmp_path, numpy_run, numpy_session_run, numpy_defaults):
    """write_run creates the directory and writes results.json and every page, nothing else."""
    specs, records = analyzed(numpy_run, numpy_defaults, ["lazy_mlp"])
    envs = numpy_env(numpy_session_run)
    out = tmp_path / "deep" / "run"
    report.write_run(out, report.results_document(RUN, specs, records, envs),
                     render(specs, records, envs, {"numpy": numpy_defaults}))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(
        [f"{page}.{ext}" for page in ("report", "run", "defaults", "specs/lazy_mlp")
         for ext in ("md", "html")] + ["results.json"])
    assert json.loads((out / "results.json").read_text())["results"][0]["spec"] == "lazy_mlp"


def test_point_latest_follows_the_newest_run(tmp_path, monkeypatch):
    """reports/latest is a relative symlink to the newest run, replaced on each call."""
    monkeypatch.setattr(rundir, "REPORTS_DIR", tmp_path)
    first, second = tmp_path / "20260101-000000", tmp_path / "20260101-000001"
    first.mkdir()
    second.mkdir()
    rundir.point_latest(first)
    latest = tmp_path / "latest"
    assert latest.is_symlink() and latest.resolve() == first.resolve()
    rundir.point_latest(second)
    assert latest.is_symlink() and os.readlink(latest) == second.name
    assert latest.resolve() == second.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, second.name, "latest"]


def test_point_latest_recovers_from_a_stale_temporary_link(tmp_path, monkeypatch):
    """A temporary link left by an interrupted run does not stop the next one."""
    monkeypatch.setattr(rundir, "REPORTS_DIR", tmp_path)
    run = tmp_path / "r1"
    run.mkdir()
    stale = tmp_path / f".latest.{os.getpid()}.tmp"
    stale.symlink_to("gone")
    rundir.point_latest(run)
    assert (tmp_path / "latest").resolve() == run.resolve()
    assert not stale.is_symlink()


def test_new_run_dir_never_reuses_a_run(tmp_path, monkeypatch):
    """Two runs in the same second get distinct directories under reports/: a finished one,
    and one still being written (its hidden staging directory reserves the id)."""
    monkeypatch.setattr(rundir, "REPORTS_DIR", tmp_path)
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt, *a: "20260101-000000")
    first = rundir.new_run_dir(None)
    assert first.staging.is_dir() and not first.final.exists()
    second = rundir.new_run_dir(None)  # the first is still being written
    assert (first.run_id, second.run_id) == ("20260101-000000", "20260101-000000-2")
    first.publish()
    assert first.final.is_dir() and not first.staging.exists()
    third = rundir.new_run_dir(None)
    assert third.run_id == "20260101-000000-3"
    explicit = rundir.new_run_dir(str(tmp_path / "mine"))
    assert explicit.final == tmp_path / "mine" and explicit.run_id == "mine"
    assert not explicit.final.exists()


def test_reused_out_is_replaced_whole(tmp_path):
    """Publishing into an --out that holds an earlier run replaces it: no old file remains."""
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "results.json").write_text("earlier run")
    (out / "logs" / "torch.log").write_text("earlier run")
    place = rundir.new_run_dir(str(out))
    (place.staging / "report.md").write_text("new")
    place.publish()
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_out_holding_other_files_is_never_replaced(tmp_path):
    """An --out that holds anything but an earlier run's files is refused, untouched (it was
    replaced whole: `--out ~/thesis` deleted the thesis)."""
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("keep me")
    (out / "report.md").write_text("keep me too")
    with pytest.raises(cli.UserError, match="chapter1.tex"):
        rundir.new_run_dir(str(out))
    assert sorted(p.name for p in out.iterdir()) == ["chapter1.tex", "report.md"]
    assert [p.name for p in tmp_path.iterdir()] == ["thesis"]


@pytest.mark.parametrize("value,text", [(None, "–"), (True, "yes"), (0.123456, "0.1235"),
                                        ([256, None], "(256, ?)"), ([10], "(10,)")])
def test_value_formatting(value, text):
    """Shapes print like Python tuples with ? for unknown dims; floats to 4 digits."""
    assert report._fmt(value) == text


def test_table_cells_escape_pipes_and_newlines():
    """A cell containing | or a newline cannot break the markdown table."""
    table = report._table(["a"], [["x | y\nz"]])
    assert table.splitlines()[2] == "| x \\| y z |"


def test_render_does_not_modify_records(numpy_run, numpy_defaults):
    """Rendering leaves the records it is given (what results.json holds) unchanged."""
    specs, records = analyzed(numpy_run, numpy_defaults, ["lazy_mlp"])
    before = copy.deepcopy(records)
    render(specs, records, {"numpy": BackendRun(interpreter="p")}, {"numpy": numpy_defaults})
    assert [r.to_json() for r in records] == [r.to_json() for r in before]


def test_lazy_table_tells_absent_declared_and_early_access(numpy_run, numpy_defaults):
    """Before the first forward: a parameter with no value yet is `declared`, one the framework
    has not created is `absent`, and a framework-level early-access note is shown when no
    parameter carries a touch message."""
    specs, records = analyzed(numpy_run, numpy_defaults, ["lazy_mlp"])
    md = render(specs, records, {}, {"numpy": numpy_defaults})["specs/lazy_mlp.md"]
    assert "| `0.weight` | (256, ?) | (256, ?) declared → (256, 20) |" in md
    flax_like = copy.deepcopy(records[0])
    flax_like.backend = "other"
    flax_like.record.lazy.before = []
    flax_like.record.lazy.early_access = "ValueError: Can't access variables on unbound modules"
    md = render(specs, [records[0], flax_like], {}, {"other": numpy_defaults})
    page = md["specs/lazy_mlp.md"]
    assert "| `0.weight` | (256, ?) | (256, ?) declared → (256, 20) | absent → (256, 20) |" in page
    assert "**other**: ValueError: Can't access variables on unbound modules" in page
    assert "| the parameter | declared, no value, native shape (256, ?) | absent (no such " \
        "parameter yet) |" in md["report.md"]


def test_agreeing_backends_share_a_column():
    """Backend columns that say the same in every row are merged, headed by every name."""
    names, cols = report.merge_agreeing(["keras", "keras_jax", "torch", "keras_torch"],
                                        [["a", "b"], ["a", "b"], ["c", "b"], ["a", "b"]])
    assert names == ["keras, keras_jax, keras_torch", "torch"]
    assert cols == [["a", "b"], ["c", "b"]]


@pytest.mark.parametrize("init, text", [
    ({"name": "kaiming_uniform", "a": math.sqrt(5), "mode": "fan_in",
      "nonlinearity": "leaky_relu"}, "U(±1/√fan_in)"),
    ({"name": "xavier_uniform", "gain": 1.0}, "U(±1.73/√fan_avg)"),
    ({"name": "variance_scaling", "scale": 1.0, "mode": "fan_in",
      "distribution": "truncated_normal"}, "truncated N(0, 1/fan_in) within ±2σ"),
    ({"name": "uniform", "a": -0.07, "b": 0.07}, "U(-0.07, 0.07)"),
    ({"name": "fan_in_uniform", "scale": 1.0}, "U(±1/√fan_in)"),
    ({"name": "zeros"}, "zeros"),
])
def test_defaults_in_a_few_symbols(init, text):
    """The defaults grid writes each initializer as its distribution."""
    assert report.short_init(init) == text


#: the modules that build the report's pages and figures, and harness diff
PAGE_MODULES = ("report", "findings", "spec_pages", "figures", "timing_digest", "diff")


@pytest.mark.parametrize("module", PAGE_MODULES)
def test_the_pages_name_no_layer_type(module):
    """The pages read layer types from the registry (backends/layers.py), so a layer type added
    there (layer_norm, embedding, ...) needs nothing here: no module building them names one."""
    import ast
    from pathlib import Path

    from backends.layers import LAYERS

    source = Path(report.__file__).with_name(f"{module}.py").read_text()
    named = [(node.lineno, node.value) for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Constant) and node.value in LAYERS]
    assert named == [], f"harness/{module}.py names layer types {named}"


def test_a_new_layer_type_takes_its_place_in_the_defaults(monkeypatch, numpy_defaults):
    """A layer type added to the registry with a default in some backend.yaml gets its rows in
    the defaults grid, in the registry's order (layer types, then roles), with no change here."""
    from backends import layers
    from harness import findings
    from harness import initializers as inits

    new = layers.LayerType("scale_shift", "y = x * weight + bias (test only)",
                           roles=(layers.Role("weight"), layers.Role("bias")))
    monkeypatch.setitem(layers.LAYERS, new.name, new)
    ones, zeros = inits.normalize({"name": "ones"}), inits.normalize({"name": "zeros"})
    other = {"scale_shift": {"bias": zeros, "weight": ones}, **numpy_defaults}
    ctx = report.Context(RUN, [], [], dict.fromkeys(["numpy", "other"]),
                         {"numpy": numpy_defaults, "other": other})
    kinds = report.default_kinds(ctx.defaults_by_backend)
    assert kinds[-2:] == [("scale_shift", "weight"), ("scale_shift", "bias")]
    assert kinds[:2] == [(next(iter(layers.LAYERS)), "weight"),
                         (next(iter(layers.LAYERS)), "bias")]
    [grid] = findings.defaults_grid(ctx)
    table = next(b for b in grid.blocks if isinstance(b, report.Table))
    rows = {row[0]: row[1:] for row in table.rows}
    assert rows["scale_shift weight"] == ["–", "ones"]
    assert "scale_shift weight (2)" in report.doc.plain(grid.summary)


def test_the_momentum_finding_names_both_sides_only_when_both_exist():
    """PyTorch's convention (m weighs the batch) against the complement, as the semantics say."""
    from harness.findings import _momentum_headline

    torch_rule = ["new = (1 - momentum) * old + momentum * batch", "unbiased"]
    keras_rule = ["moving = momentum * moving + (1 - momentum) * batch", "biased"]
    assert _momentum_headline(["numpy", "torch"], [torch_rule, torch_rule]) == \
        "the momentum convention is PyTorch's everywhere"
    assert _momentum_headline(["torch", "keras"], [torch_rule, keras_rule]) == \
        "the momentum convention is PyTorch's in torch and its complement (1 - m) in keras"
    assert "complement (1 - m) of PyTorch's everywhere" in \
        _momentum_headline(["keras"], [keras_rule])


def test_option_defaults_are_shown_beside_the_specs(numpy_run, numpy_session_run,
                                                    numpy_defaults):
    """Each backend's declared layer_norm eps, GELU form and dropout rate, with its source,
    next to the spec's own default, on the defaults page (a required field says so)."""
    from harness import envs

    found = envs.discover()
    specs, records = analyzed(numpy_run, numpy_defaults, ["lazy_mlp"])
    ctx = report.Context(RUN, specs, records, numpy_env(numpy_session_run),
                         {"numpy": numpy_defaults}, option_defaults={
                             name: found[name].option_defaults for name in ("flax", "keras")})
    defaults = report.render(ctx)["defaults.md"]
    assert "| layer_norm.eps | 1e-05 | flax | 1e-06 | flax/linen/normalization.py" in defaults
    assert "| gelu.approximate | none | flax | tanh |" in defaults
    assert "| layer_norm.eps | 1e-05 | keras | 0.001 |" in defaults
    assert "| dropout.rate | 0.5 | keras | required (no default) |" in defaults
    assert "layer_norm.eps" not in render(specs, records, numpy_env(numpy_session_run),
                                          {"numpy": numpy_defaults})["defaults.md"]


def test_the_attention_mask_convention_is_shown_beside_the_native_layouts(tmp_path,
                                                                         numpy_defaults):
    """A spec page with attention shows each framework's mask convention as its worker
    measured it and its backend.yaml declares it (the registry's ``semantics`` of the layer
    type); a spec without attention does not."""
    from harness import envs

    specs = [load_spec(ROOT / "tests" / "conformance" / "specs" / "conformance_attention.yaml"),
             load_spec(SPECS_DIR / "lazy_mlp.yaml")]
    result = run_worker("numpy", PYTHON, specs, tmp_path, device="cpu", timeout=60,
                        progress=quiet)
    records = [analysis.analyze(s, numpy_defaults, "numpy", rec, arr, None)
               for s, rec, arr in zip(specs, result.records, result.arrays)]
    declared = envs.discover()["numpy"].semantics
    environments = {"numpy": BackendRun(interpreter=str(PYTHON), worker=result.environment,
                                        wall_s=result.wall_s, log="logs/numpy.log",
                                        declared=declared)}
    pages = render(specs, records, environments, {"numpy": numpy_defaults})
    page = pages["specs/conformance_attention.md"]  # one backend: the section is folded
    shapes = page.split('<details id="shapes">', 1)[1].split("</details>", 1)[0]
    assert "Per framework, what an attention mask's True means" in shapes
    row = next(line for line in shapes.splitlines() if line.startswith("| `numpy` |"))
    assert "(measured: the causal layer's query 0 ignores token 1)" in row
    assert declared["attention_mask"].replace(">", "&gt;") in row
    assert "attention mask" not in pages["specs/lazy_mlp.md"]


def test_not_judged_gradients_are_said_so_with_their_reason(numpy_run, numpy_session_run,
                                                            numpy_defaults):
    """A spec whose float32 twin shows a chaotic training-mode backward, judged in inference
    mode: its failed training-mode gradient comparisons read 'not judged' on the spec page and
    in the numerics finding, with the measured reason, and the verdict stays pass."""
    spec, rec, arrays = numpy_run["small_cnn"]
    got = dict(arrays)
    ref = {k: v for k, v in arrays.items() if k == "train_output" or k.startswith("trained/")}
    for p in (p for p in spec.params if p.trainable):
        g = arrays[f"grad/{p.name}"].astype(np.float64)
        scale = max(np.abs(g).max(), 1e-3)
        ref[f"grad/{p.name}"], ref[f"float32/grad/{p.name}"] = g, g + 0.2 * scale
        got[f"grad/{p.name}"] = (g + 4 * scale).astype(np.float32)
        ref[f"inference_grad/{p.name}"] = got[f"inference_grad/{p.name}"] = g
    result = analysis.analyze(spec, numpy_defaults, "numpy", rec, got, ref)
    pages = render([spec], [result], numpy_env(numpy_session_run), {"numpy": numpy_defaults})
    md, page = pages["report.md"], pages["specs/small_cnn.md"]
    assert "**Verdict: pass.**" in md
    assert "small_cnn: training-mode gradients not judged" in md and "20% of their scale" in md
    assert "| not judged |" in page and "(inference mode) | numpy |" in page
    assert "training-mode comparisons not judged (ill-conditioned in float32)" in page


def _pid_jobs(tmp_path, n, fail=(), slow=()):
    """Figure-like jobs that write the pid of the process that ran them (a job in ``fail``
    raises in a child process only; one in ``slow`` sleeps first)."""
    import time
    parent = os.getpid()

    def draw(i):
        if i in slow:
            time.sleep(60)
        if i in fail and os.getpid() != parent:
            raise RuntimeError("lost in the child")
        (tmp_path / f"f{i}.png").write_text(str(os.getpid()))
        return True
    return [(f"kind {i}", f"f{i}.png", lambda i=i: draw(i)) for i in range(n)]


def test_figures_are_drawn_half_by_a_forked_child_half_here(tmp_path):
    """The larger half (0 to 2) in a child process, the rest here; every name returned at
    start (for the report) and at finish, in the jobs' order; the child failed at job 1: it
    and job 2 are drawn here, job 0 is not drawn again."""
    from harness.figures import Drawing

    with Drawing(_pid_jobs(tmp_path, 5, fail={1})) as drawing:
        named = drawing.start()
        drawn = drawing.finish()
    assert list(named) == list(drawn) == [f"kind {i}" for i in range(5)]
    pids = [int((tmp_path / f"f{i}.png").read_text()) for i in range(5)]
    assert pids[0] != os.getpid() and pids[1:] == [os.getpid()] * 4, pids


def test_figures_are_drawn_here_while_another_thread_runs(tmp_path):
    """No fork beside another thread (a lock it holds would be the child's deadlock)."""
    import threading

    from harness.figures import Drawing

    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with Drawing(_pid_jobs(tmp_path, 3)) as drawing:
            drawing.start()
            drawing.finish()
    finally:
        stop.set()
        other.join()
    assert {int((tmp_path / f"f{i}.png").read_text()) for i in range(3)} == {os.getpid()}


def test_leaving_the_drawing_by_an_error_ends_its_child(tmp_path):
    """An error (an interruption, say) before finish(): the child is killed and reaped at
    once, not waited for."""
    import time

    from harness.figures import Drawing

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with Drawing(_pid_jobs(tmp_path, 2, slow={0})) as drawing:
            drawing.start()
            child = drawing.child
            raise KeyboardInterrupt
    assert time.monotonic() - t0 < 30 and drawing.child is None
    with pytest.raises(ChildProcessError):
        os.waitpid(child, os.WNOHANG)  # reaped: no zombie left
