"""The report's pages from one document model, as markdown and as static HTML, and the HTML in a
real headless Chromium (Debian's ``chromium`` package, driven by Playwright): every page loads
with no console error, the findings and the timing grid are on the first screen, the zoo's
grids at real sizes show, sorting and folding work, and a screenshot of the first screen is kept.

The run rendered is real: the NumPy reference and a backend with a fake compiled mode
(tests/fakes/compiling_adapter.py) run by their workers, analysed, with a declared known
limitation (the fake compiler falls back on the spec ``falls_back``). The browser is a test
dependency: without it the test fails with a one-line cause, it never skips.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from unit_helpers import PYTHON, ROOT, SPECS_DIR, doc, quiet

from backends.protocol import Budget, TimingRequest
from harness import analysis, document, known, report
from harness.runner import BackendRun, run_worker
from harness.spec import build_spec, load_spec

TINY = Budget(warmup_calls=2, warmup_s=0.0, min_block_s=1e-4, min_blocks=5, min_total_s=0.0)
RUN = {"id": "html-test", "started": "2026-01-01 00:00:00 UTC", "device": "cpu",
       "command": "python -m harness compare (unit test)", "seed_note": "from each spec"}
#: where the browser test leaves its screenshot (HARNESS_ARTIFACTS moves it)
ARTIFACTS = Path(os.environ.get("HARNESS_ARTIFACTS") or ROOT / "reports" / "test-artifacts")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 1000}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, numpy_defaults):
    """A real run (numpy reference + fake compiling backend) rendered into a directory."""
    specs = [load_spec(SPECS_DIR / "lazy_mlp.yaml"), load_spec(SPECS_DIR / "tied.yaml"),
             load_spec(SPECS_DIR / "shared_gradient.yaml"),
             build_spec(doc([{"type": "dense", "units": 3}], input=(2, 4), name="falls_back"),
                        "falls_back.yaml"),
             build_spec(doc([{"type": "dense", "units": 3}], input=(2, 5, 4), name="zoo_seq"),
                        "specs/models/zoo_seq.yaml")]  # a zoo model: timings at real sizes
    ref = run_worker("numpy", PYTHON, specs, tmp_path_factory.mktemp("ref"), device="cpu",
                     timeout=120, progress=quiet)
    fake = run_worker("fake", PYTHON, specs, tmp_path_factory.mktemp("fake"), device="cpu",
                      timeout=120, progress=quiet, adapter="tests.fakes.compiling_adapter",
                      timing=TimingRequest(budget=TINY))
    refs = {s.name: arr for s, arr in zip(specs, ref.arrays)}
    results = [analysis.analyze(s, numpy_defaults, "numpy", rec, arr, None)
               for s, rec, arr in zip(specs, ref.records, ref.arrays)]
    results += [analysis.analyze(s, numpy_defaults, "fake", rec, arr, refs[s.name])
                for s, rec, arr in zip(specs, fake.records, fake.arrays)]
    analysis.analyze_timings(results, specs)
    limitation = known.Limitation("fake", "falls_back", analysis.COMPILED, None,
                                  "the fake compiler gives up on this spec",
                                  "it falls back at the first call", "tests/fakes")
    known.apply(results, {"fake": (limitation,)}, {})
    environments = {"numpy": BackendRun(interpreter=str(PYTHON), worker=ref.environment,
                                        wall_s=ref.wall_s),
                    "fake": BackendRun(interpreter=str(PYTHON), worker=fake.environment,
                                       wall_s=fake.wall_s)}
    ctx = report.Context(RUN, specs, results, environments,
                         {"numpy": numpy_defaults, "fake": numpy_defaults},
                         limitations={"fake": (limitation,)})
    out = tmp_path_factory.mktemp("report")
    files = report.render(ctx)
    report.write_run(out, report.results_document(RUN, specs, results, environments), files)
    return out, files, results


def test_every_page_in_both_formats(rendered):
    """report, run, defaults and one page per spec, each as .md and .html."""
    out, files, _ = rendered
    pages = {"report", "run", "defaults", "specs/lazy_mlp", "specs/tied",
             "specs/shared_gradient", "specs/falls_back", "specs/zoo_seq"}
    assert set(files) == {p + ext for p in pages for ext in (".md", ".html")}
    for name in files:
        assert (out / name).is_file()


def test_known_limitation_is_a_finding_not_a_failure(rendered):
    """The declared limitation's failed check is on the first screen as a finding; the run
    passes."""
    _, files, results = rendered
    assert all(r.passed for r in results)
    top = files["report.md"]
    first_screen = "\n".join(top.splitlines()[:40])
    assert "Verdict: pass, with known framework issues." in first_screen
    assert "**Known limitation**: fake: the fake compiler gives up on this spec" in first_screen
    assert "failed as a framework's declared known limitation or defect" in first_screen


def _html_text(html: str) -> str:
    """The text a browser shows of an HTML page (tags dropped, entities decoded)."""
    from html.parser import HTMLParser

    class Text(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.parts, self.skip = [], False

        def handle_starttag(self, tag, attrs):
            self.skip = tag in ("script", "style")

        def handle_endtag(self, tag):
            self.skip = False

        def handle_data(self, data):
            if not self.skip:
                self.parts.append(data)

    parser = Text()
    parser.feed(html)
    return " ".join("".join(parser.parts).split())


def test_markdown_and_html_say_the_same(rendered):
    """One document, two renderings: every table cell of every markdown page shows, as text,
    in the same page's HTML."""
    _, files, _ = rendered
    for name in (n for n in files if n.endswith(".md")):
        text = _html_text(files[name[:-3] + ".html"])
        for line in files[name].splitlines():
            if not line.startswith("| ") or line.startswith("|---"):
                continue
            for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1]):
                shown = re.sub(r"\[((?:[^\]\\]|\\.)*)\]\([^)]*\)", r"\1", cell)
                shown = re.sub(r"(?<!\\)`", "", shown.replace("**", ""))
                shown = re.sub(r"\\(.)", r"\1", shown)
                shown = shown.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
                shown = " ".join(shown.split()).strip("*")
                assert shown in text, (name, shown)


def test_untrusted_text_cannot_inject_markup():
    """A spec description or worker error with HTML or markdown is shown as text in both."""
    page = document.Page("report", "t <script>", [document.Paragraph(
        "<img src=x onerror=alert(1)> | ![x](y) [a](javascript:b) `c`"),
        document.Table(["h"], [["<b>|</b>"]])])
    html = document.to_html(page)
    assert "<img src=x" not in html and "<script>" not in html.split("<script>", 1)[0] + "x"
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    md = document.to_markdown(page)
    assert "<img" not in md and "\\[a\\](javascript:b)" in md and "\\|" in md


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: the HTML report's browser test needs Debian's "
                    "chromium (apt-get install -y chromium; see the README's test command)",
                    pytrace=False)
    return path


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]' (the test extra "
                    "holds it)", pytrace=False)
    return sync_playwright


def test_html_report_in_a_real_browser(rendered, tmp_path):
    """Every page loads in headless Chromium with no console error; on the top page the
    findings and the timing grid come first (before any detail) and the findings fit the
    first screen; clicking a header sorts its table; a folded section opens; a screenshot of
    the first screen is kept."""
    out, files, _ = rendered
    chromium, sync_playwright = _chromium(), _playwright()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "html-report-first-screen.png"
    errors = []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True,
            args=CHROMIUM_FLAGS, viewport=VIEWPORT)
        try:
            page = context.new_page()
            page.on("console", lambda m: errors.append(f"{m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            for name in sorted(f for f in files if f.endswith(".html")):
                page.goto((out / name).as_uri())
                page.wait_for_load_state("load")
                assert page.title(), name
            assert errors == [], errors

            page.goto((out / "report.html").as_uri())
            page.screenshot(path=str(shot))
            findings = page.locator("#findings")
            timing = page.locator("#timing table").first
            assert findings.is_visible() and timing.is_visible()
            box = findings.bounding_box()
            assert box["y"] + box["height"] <= VIEWPORT["height"], box
            # nothing but the verdict, the summary and the findings comes before the grid
            before = page.evaluate("""() => {
                const grid = document.querySelector('#timing table');
                return Array.from(document.querySelectorAll('section, details'))
                  .filter(e => !e.contains(grid) &&
                          (e.compareDocumentPosition(grid) & Node.DOCUMENT_POSITION_FOLLOWING))
                  .map(e => e.id); }""")
            assert before == ["findings"], before
            # the zoo's grids: throughput, speed-up, compile cost and the worker's real
            # per-step memory peak, each with a best cell in bold
            zoo = page.locator("#real-sizes table")
            assert zoo.count() == 4 and zoo.first.is_visible()
            assert page.locator("#real-sizes table strong").count() >= 4

            # sorting: click the first timing column twice, numbers ascending then descending
            header = page.locator("#timing table th").nth(5)
            column = page.locator("#timing table tbody tr td:nth-child(6)")
            header.click()
            up = [float(v) for v in column.evaluate_all(
                "cells => cells.map(c => c.getAttribute('data-sort'))") if v]
            assert up == sorted(up) and len(up) >= 2
            header.click()
            down = [float(v) for v in column.evaluate_all(
                "cells => cells.map(c => c.getAttribute('data-sort'))") if v]
            assert down == sorted(up, reverse=True)

            # folding: a passed section of a spec page is closed until its summary is clicked
            page.goto((out / "specs" / "tied.html").as_uri())
            folded = page.locator("details#numerics")
            assert folded.get_attribute("open") is None
            assert not page.locator("details#numerics table").is_visible()
            folded.locator("summary").click()
            assert folded.get_attribute("open") is not None
            assert page.locator("details#numerics table").is_visible()
            assert errors == [], errors
        finally:
            context.close()
    assert shot.is_file() and shot.stat().st_size > 10_000
