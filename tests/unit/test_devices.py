"""The parent's GPU path, without a GPU (issue 23): whether a GPU is usable (harness.devices,
with nvidia-smi's answer and /proc/driver/nvidia replaced in-process), the refusal of
``--device cuda`` before anything is provisioned or run, ``auto``'s choice and its reason in
the report, and a whole ``compare --device cuda`` with a fake GPU backend
(tests/fakes/gpu_adapter.py, run under Gluon's name): CUDA device records, GPU timings with
peak device memory, the per-device semantics Gluon declares, a CPU-only backend beside it, and
the GPU facts in the report."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from unit_helpers import PYTHON, ROOT

from harness import analysis, cli, compare, devices, envs, provisioning, rundir
from harness.envs import UserError
from tests.fakes import gpu_adapter

WRAPPER = ROOT / "tests" / "fakes" / "corrupting_python"
H100 = "0, GPU-5f1d6a3e-0000-1111-2222-333344445555, NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB"
H100_FACTS = {"index": 0, "uuid": "GPU-5f1d6a3e-0000-1111-2222-333344445555",
              "name": "NVIDIA H100 80GB HBM3", "driver": "550.54.15", "memory": "81559 MiB"}
TWO = H100 + "\n1, GPU-aaaa0000-0000-1111-2222-333344445555, NVIDIA A100-SXM4-40GB, 550.54.15, " \
    "40960 MiB\n"
SMI_FAILED = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
              "Make sure that the latest NVIDIA driver is installed and running.\n")


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """This process's view of the machine's GPUs: ``machine(smi=(status, output))`` stands for
    nvidia-smi's answer (None: not installed), ``proc=`` for /proc/driver/nvidia (a folder, or
    None: no driver), ``mask=`` for CUDA_VISIBLE_DEVICES (None: unset)."""
    def set_up(smi=None, proc=None, mask=None):
        monkeypatch.setattr(devices, "nvidia_smi", lambda: smi)
        monkeypatch.setattr(devices, "PROC_DRIVER", proc or tmp_path / "no-driver")
        if mask is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mask)
    set_up()  # by default: no GPU, whatever this machine has
    return set_up


# ------------------------------------------------------------------ is a GPU usable, and why

def fake_nvidia_smi(folder: Path, body: str) -> Path:
    """An executable ``nvidia-smi`` in ``folder`` running the shell ``body``."""
    folder.mkdir(exist_ok=True)
    (folder / "nvidia-smi").write_text(f"#!/bin/sh\n{body}\n")
    (folder / "nvidia-smi").chmod(0o755)
    return folder


def test_nvidia_smi_is_asked_for_the_gpus_facts(tmp_path, monkeypatch):
    """The real call: nvidia-smi on PATH gets the query (its arguments echoed back here);
    absent, None; one that hangs is cut after SMI_TIMEOUT_S."""
    sleep = shutil.which("sleep")
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(tmp_path / "bin", 'echo "$@"; exit 0')))
    assert devices.nvidia_smi() == (0, " ".join(devices.QUERY) + "\n")
    fake_nvidia_smi(tmp_path / "bin", f"exec {sleep} 30")
    monkeypatch.setattr(devices, "SMI_TIMEOUT_S", 0.3)
    assert devices.nvidia_smi() == (124, "no answer within 0.3 s")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    assert devices.nvidia_smi() is None


def test_no_driver_at_all(machine):
    """No nvidia-smi and no /proc/driver/nvidia: not usable, and the reason names both."""
    probe = devices.probe_gpus()
    assert not probe.usable
    assert probe.why.startswith("looked for the NVIDIA driver: no nvidia-smi on PATH and no ")


def test_failing_nvidia_smi_is_not_usable_and_quoted(machine):
    """nvidia-smi present but failing (a driver not loaded): its own first line is the reason."""
    machine(smi=(9, SMI_FAILED))
    probe = devices.probe_gpus()
    assert not probe.usable
    assert probe.why == ("nvidia-smi failed (exit status 9): NVIDIA-SMI has failed because it "
                         "couldn't communicate with the NVIDIA driver. Make sure that the latest "
                         "NVIDIA driver is installed and running.")


def test_nvidia_smi_listing_no_gpu(machine):
    machine(smi=(0, ""))
    assert devices.probe_gpus() == devices.GpuProbe((), "nvidia-smi lists no GPU")


def test_one_gpu_listed_is_usable_with_its_facts(machine):
    machine(smi=(0, H100 + "\n"))
    probe = devices.probe_gpus()
    assert probe.usable and [g.to_json() for g in probe.gpus] == [H100_FACTS]
    assert probe.why == ("nvidia-smi lists 1 usable GPU: 0: NVIDIA H100 80GB HBM3 (driver "
                         "550.54.15, 81559 MiB)")


@pytest.mark.parametrize("mask, visible", [
    ("", []), ("-1", []), ("7", []), ("GPU-ffff", []), ("NoDevFiles", []),
    ("1", [1]), ("1,0", [1, 0]), (" 0 ", [0]), ("0,7,1", [0]), ("0,0", [0]),
    ("GPU-aaaa", [1]), ("GPU-5f1d,1", [0, 1]), ("MIG-1234", [0, 1])])
def test_cuda_visible_devices_is_read_as_cuda_reads_it(machine, mask, visible):
    """Indices or UUID prefixes, in order, up to the first entry naming no GPU; empty, -1 or
    an unknown GPU hides them all, and the reason says so."""
    machine(smi=(0, TWO), mask=mask)
    probe = devices.probe_gpus()
    assert [g.index for g in probe.gpus] == visible
    if not visible:
        assert "CUDA_VISIBLE_DEVICES" in probe.why
    else:
        assert f"(CUDA_VISIBLE_DEVICES={mask!r})" in probe.why


def test_proc_driver_when_nvidia_smi_is_not_installed(machine, tmp_path):
    """A container given only the compute capability has the driver but no nvidia-smi: the
    GPUs come from /proc/driver/nvidia/gpus, in bus order."""
    proc = tmp_path / "nvidia"
    for bus, model in (("0000:9a:00.0", "NVIDIA H200"), ("0000:1b:00.0", "NVIDIA H100 PCIe")):
        (proc / "gpus" / bus).mkdir(parents=True)
        (proc / "gpus" / bus / "information").write_text(
            f"Model: \t\t {model}\nIRQ:   \t\t 17\nGPU UUID: \t GPU-{bus}\n"
            f"Bus Location: \t {bus}\n")
    (proc / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  "
                                  "Tue Mar  5 22:23:56 UTC 2024\nGCC version:  gcc 12\n")
    machine(proc=proc)
    probe = devices.probe_gpus()
    assert [(g.index, g.name, g.driver, g.memory) for g in probe.gpus] == [
        (0, "NVIDIA H100 PCIe", "550.54.15", "unknown"), (1, "NVIDIA H200", "550.54.15", "unknown")]
    assert probe.why.startswith(f"{proc}/gpus lists 2 usable GPUs: 0: NVIDIA H100 PCIe")
    (proc / "gpus" / "0000:9a:00.0" / "information").unlink()
    (proc / "gpus" / "0000:1b:00.0" / "information").unlink()
    assert devices.probe_gpus().why == f"{proc}/gpus lists no GPU"


def test_choose_device(machine):
    """cpu is taken as asked, without looking; auto takes the GPU only when one is usable and
    says why; cuda without one is a user error naming what was looked for."""
    assert devices.choose_device("cpu") == devices.DeviceChoice("cpu", "cpu", "")
    auto = devices.choose_device("auto")
    assert (auto.device, auto.gpus) == ("cpu", ())
    assert auto.why.startswith("no usable NVIDIA GPU: looked for the NVIDIA driver")
    with pytest.raises(UserError, match=r"^--device cuda: no usable NVIDIA GPU \(looked for the "
                                        r"NVIDIA driver: no nvidia-smi on PATH"):
        devices.choose_device("cuda")
    machine(smi=(0, H100))
    for requested in ("auto", "cuda"):
        choice = devices.choose_device(requested)
        assert (choice.device, choice.why) == ("cuda", devices.probe_gpus().why)
        assert [g.to_json() for g in choice.gpus] == [H100_FACTS]


# ------------------------------------------------------------------ refused before anything runs

def harness(*args) -> tuple[int, str, str]:
    """``python -m harness ARGS`` in this process (its GPU probe replaceable): (exit status,
    stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in args])
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Environments and reports under tmp_path, so that a test can show nothing was made."""
    monkeypatch.setenv("HARNESS_ENV_DIR", str(tmp_path / "envs"))
    monkeypatch.setattr(rundir, "REPORTS_DIR", tmp_path / "reports")
    return tmp_path


@pytest.mark.parametrize("command", [
    ["compare", "specs/tied.yaml", "--timing", "off"],
    ["compare", "specs/tied.yaml", "--backend", "numpy", "--python", f"numpy={PYTHON}"],
    ["setup"], ["setup", "--backend", "flax"],
    ["convert", "specs/tied.yaml", "--from", "torch", "--weights", "w.pt", "--to", "flax",
     "--out", "w.msgpack"]])
def test_device_cuda_without_a_gpu_is_refused_before_anything(machine, isolated, command):
    """compare, setup and convert with --device cuda and no usable GPU: exit 2, one line that
    says what was looked for; no environment, run directory or worker."""
    rc, out, err = harness(*command, "--device", "cuda")
    assert rc == 2 and out == "", (rc, out, err)
    assert err.splitlines() == [
        "error: --device cuda: no usable NVIDIA GPU (looked for the NVIDIA driver: no nvidia-smi "
        f"on PATH and no {devices.PROC_DRIVER}); nothing was provisioned or run (--device cpu "
        "runs on the CPU; auto takes a GPU only where one is usable)"]
    assert not (isolated / "envs").exists() and not (isolated / "reports").exists()


def test_refusal_from_the_command_line_with_a_failing_nvidia_smi(tmp_path):
    """The real program, with an nvidia-smi on PATH that fails as it does without a loaded
    driver (first on PATH: the same on a machine with a GPU): one line, exit 2, at once, and
    no environment created."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\nprintf '%s' \"{SMI_FAILED.strip()}\"\nexit 9\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               HARNESS_ENV_DIR=str(tmp_path / "envs"), HARNESS_REPORTS_DIR=str(tmp_path / "r"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "harness", "compare", "specs/tied.yaml",
                           "--device", "cuda", "--timing", "off"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: --device cuda: no usable NVIDIA GPU (nvidia-smi failed (exit status 9): "
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure "
        "that the latest NVIDIA driver is installed and running.); nothing was provisioned or "
        "run (--device cpu runs on the CPU; auto takes a GPU only where one is usable)"]
    assert time.monotonic() - started < 30  # a bound against hangs, not a timing claim
    assert not (tmp_path / "envs").exists() and not (tmp_path / "r").exists()


# ------------------------------------------------------------------ auto

def test_auto_without_a_gpu_runs_on_the_cpu_and_the_report_says_why(machine, isolated):
    out = isolated / "run"
    rc, _, err = harness("compare", "specs/tied.yaml", "--backend", "numpy", "--python",
                         f"numpy={PYTHON}", "--timing", "off", "--out", out)
    assert rc == 0, err
    run = json.loads((out / "results.json").read_text())["run"]
    assert (run["device"], run["device_used"], run["gpus"]) == ("auto", "cpu", [])
    assert run["device_why"].startswith("no usable NVIDIA GPU: looked for the NVIDIA driver")
    assert "device auto → cpu (no usable NVIDIA GPU: looked for the NVIDIA driver" in \
        (out / "report.md").read_text()
    assert err.count("no usable NVIDIA GPU") == 0  # said in the report, not on every run
    assert not (isolated / "envs").exists()


def test_auto_with_a_gpu_takes_it_and_the_report_says_why(machine, isolated):
    """auto with a usable GPU: the run is a cuda run (a CPU-only backend stays on the CPU and
    says so), and the report names the GPU and why it was taken."""
    machine(smi=(0, H100))
    out = isolated / "run"
    rc, _, err = harness("compare", "specs/tied.yaml", "--backend", "numpy", "--python",
                         f"numpy={PYTHON}", "--timing", "off", "--out", out)
    assert rc == 0, err
    data = json.loads((out / "results.json").read_text())
    run = data["run"]
    assert (run["device"], run["device_used"], run["gpus"]) == ("auto", "cuda", [H100_FACTS])
    assert "--device auto: cuda (nvidia-smi lists 1 usable GPU: 0: NVIDIA H100" in err
    assert data["environments"]["numpy"]["device"] == "cpu"
    assert "runs on the CPU only; --device cuda applies to the others" in \
        data["environments"]["numpy"]["note"]
    report = (out / "report.md").read_text()
    assert ("device auto → cuda (nvidia-smi lists 1 usable GPU: 0: NVIDIA H100 80GB HBM3 (driver "
            "550.54.15, 81559 MiB)); seed from each spec.") in report


# ------------------------------------------------------------------ a whole GPU run, faked

GPU_SPEC = {"name": "gpu_cnn", "input": [4, 3, 8, 8],
            "init": {"weight": "kaiming_uniform", "bias": "zeros"},
            "layers": [{"type": "conv2d", "channels": 4, "kernel": 3, "padding": 1},
                       {"type": "batch_norm"}, {"type": "relu"},
                       {"type": "max_pool2d", "pool": 2}, {"type": "flatten"},
                       {"type": "dense", "units": 3}]}


def fake_gpu_compare(tmp_path, monkeypatch, device: str, *extra) -> tuple[int, str, Path]:
    """compare GPU_SPEC with the fake GPU framework as ``gluon`` (user's order: gluon, then the
    NumPy reference) on ``device``: (exit status, stderr, run directory)."""
    spec = tmp_path / "gpu_cnn.json"
    spec.write_text(json.dumps(GPU_SPEC))
    monkeypatch.setenv("HARNESS_TEST_PYTHON", sys.executable)
    monkeypatch.setenv("CORRUPT_ADAPTER", "tests.fakes.gpu_adapter")
    monkeypatch.delenv("CORRUPT_MODE", raising=False)
    out = tmp_path / f"run-{device}"
    rc, _, err = harness("compare", spec, "--backend", "gluon", "--backend", "numpy",
                         "--python", f"gluon={WRAPPER}", "--python", f"numpy={PYTHON}",
                         "--device", device, "--out", out, "--threads", "1", *extra)
    return rc, err, out


def test_a_cuda_run_with_a_gpu_backend_and_a_cpu_only_one(machine, isolated, monkeypatch):
    """The parent's whole --device cuda path, without a GPU: the GPU build of gluon is chosen
    (its cells carry that Backend: the sort that crashed), the worker's CUDA device, GPU timings
    with peak device memory (repeated in a second process, and the roofline at the GPU's
    size), Gluon's running-variance rule declared for cuda (unbiased),
    the NumPy reference on the CPU beside it, and the GPU's facts, all in results.json and the
    report; nothing provisioned."""
    machine(smi=(0, H100))
    rc, err, out = fake_gpu_compare(isolated, monkeypatch, "cuda", "--roofline",
                                    "--repeats", "2")
    assert rc == 0 and "Traceback" not in err, err
    data = json.loads((out / "results.json").read_text())
    assert data["run"]["gpus"] == [H100_FACTS]
    assert (data["run"]["device"], data["run"]["device_used"]) == ("cuda", "cuda")
    gluon, numpy = data["environments"]["gluon"], data["environments"]["numpy"]
    assert (gluon["device"], gluon["worker"]["device"], gluon["worker"]["device_name"]) == \
        ("cuda", "cuda:0", gpu_adapter.DEVICE_NAME)
    assert gluon["interpreter"] == str(WRAPPER)
    assert (numpy["device"], numpy["worker"]["device"]) == ("cpu", "cpu")
    assert numpy["note"] == "runs on the CPU only; --device cuda applies to the others"
    assert [(r["backend"], r["device"], r["passed"]) for r in data["results"]] == \
        [("gluon", "cuda:0", True), ("numpy", "cpu", True)]  # the user's order
    (gluon_result,) = [r for r in data["results"] if r["backend"] == "gluon"]
    timings = gluon_result["timings"]
    assert {(t["mode"], t["phase"]) for t in timings} == {("eager", "inference"),
                                                          ("eager", "train")}
    assert all(t["memory_peak"] == gpu_adapter.PEAK_BYTES for t in timings)
    assert all(len(t["process_medians_s"]) == 2 for t in timings)  # a repeat on the GPU too
    assert gluon["done"]["roofline"]["batch"] == compare.ROOFLINE_N["cuda"]  # the GPU's size
    running_var = [c for c in gluon_result["checks"]
                   if c["check"] == f"1.running_var_{analysis.RUNNING_STAT}"]
    assert len(running_var) == 1 and running_var[0]["passed"], gluon_result["checks"]
    assert "PyTorch's rule (the rule declared for cuda)" in running_var[0]["detail"]
    report = (out / "report.md").read_text()
    assert ("device cuda (nvidia-smi lists 1 usable GPU: 0: NVIDIA H100 80GB HBM3 (driver "
            "550.54.15, 81559 MiB)); seed from each spec.") in report
    run_page = (out / "run.md").read_text()
    assert f"cuda:0 ({gpu_adapter.DEVICE_NAME})" in run_page
    spec_page = (out / "specs" / "gpu_cnn.md").read_text()
    assert spec_page.count(f"peak device memory {gpu_adapter.PEAK_BYTES / 2**20:,.1f} MiB") == 2
    assert r"\[declared: unbiased on cuda; cpu: biased\]" in run_page
    assert not (isolated / "envs").exists()


def test_the_same_backend_on_the_cpu_is_held_to_its_cpu_rule(machine, isolated, monkeypatch):
    """The witness that the declared rule follows the device: the same fake (which updates
    with the unbiased variance) run as gluon on the CPU fails the running-variance check,
    since Gluon declares the biased rule there."""
    rc, err, out = fake_gpu_compare(isolated, monkeypatch, "cpu", "--timing", "off")
    assert rc == 1, err
    data = json.loads((out / "results.json").read_text())
    (gluon_result,) = [r for r in data["results"] if r["backend"] == "gluon"]
    assert gluon_result["device"] == "cpu"
    failed = [c for c in gluon_result["checks"] if not c["passed"]]
    assert [c["check"] for c in failed] == [f"1.running_var_{analysis.RUNNING_STAT}"], failed
    assert "the biased batch variance (this framework's rule) (the rule declared for cpu)" in \
        failed[0]["detail"]
    assert r"\[declared: biased on cpu; cuda: unbiased\]" in (out / "run.md").read_text()


def test_setup_device_cuda_provisions_the_gpu_builds_ahead(machine, isolated, monkeypatch):
    """setup --device cuda with a usable GPU: each backend's GPU build is created ahead, its
    size stated first (here a toy backend and a local index, not multi-GB CUDA wheels)."""
    from tests.fakes.package_index import PackageIndex
    machine(smi=(0, H100))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_CACHE_DIR", str(isolated / "pip-cache"))
    for key in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(key, raising=False)
    (isolated / "wheels").mkdir()
    index = PackageIndex(isolated / "wheels")
    folder = isolated / "backends" / "toy"
    folder.mkdir(parents=True)
    (folder / "requirements.txt").write_text("# the CPU build: never installed here\n")
    (folder / "requirements-cuda.txt").write_text(index.requirements())
    toy = envs.Backend("toy", folder, "Toy", {}, sizes={
        "cuda": envs.DeclaredSize("a test's own number", disk_gb=0.03)})
    monkeypatch.setattr(provisioning, "select", lambda names: [toy])
    try:
        rc, out, err = harness("setup", "--device", "cuda")
    finally:
        index.close()
    assert rc == 0, err
    assert out == f"toy-cuda: ready ({isolated / 'envs' / 'toy-cuda' / 'bin' / 'python'})\n"
    lines = err.splitlines()
    assert lines[0].startswith("--device cuda: nvidia-smi lists 1 usable GPU")
    assert lines[2].startswith("[setup] toy-cuda: about 0.03 GB on disk (declared in "
                               f"{envs.display_path(folder / 'backend.yaml')}: a test's own "
                               "number); ")
    assert any("fetching harness_size_probe-1.0-py3-none-any.whl" in line for line in lines)
    assert sorted(p.name for p in (isolated / "envs").iterdir() if p.is_dir()) == ["toy-cuda"]


# ------------------------------------------------------------------ benchmarks/gpu_check.py

def gpu_check(*args) -> tuple[int, str, str]:
    """benchmarks/gpu_check.py in this process (its GPU probe replaceable)."""
    from benchmarks import gpu_check as script
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = script.main([str(a) for a in args])
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def test_gpu_check_help_names_every_option():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    for option in ("--backend NAME", "--python NAME=PATH", "--wheels DIR", "--rounds",
                   "--threads", "--models", "--no-conformance", "HARNESS_DEVICE=cuda",
                   "README, 'GPUs', has the exact lines"):
        assert option in proc.stdout, option


def test_gpu_check_without_a_gpu_refuses_in_one_line(machine, isolated, monkeypatch):
    """No usable GPU: exit 2, one line naming what was looked for; no environment, no
    scratch folder, no worker."""
    monkeypatch.setattr("tempfile.tempdir", str(isolated / "tmp"))
    (isolated / "tmp").mkdir()
    rc, out, err = gpu_check("--python", f"torch={PYTHON}")
    assert (rc, out) == (2, "")
    assert err.splitlines() == [
        "error: gpu_check: no usable NVIDIA GPU (looked for the NVIDIA driver: no nvidia-smi on "
        f"PATH and no {devices.PROC_DRIVER}); nothing was checked"]
    assert not (isolated / "envs").exists() and list((isolated / "tmp").iterdir()) == []


def test_gpu_check_from_the_command_line_with_a_failing_nvidia_smi(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               HARNESS_ENV_DIR=str(tmp_path / "envs"))
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == ("error: gpu_check: no usable NVIDIA GPU (nvidia-smi failed (exit "
                           "status 6): No devices were found); nothing was checked\n")
    assert not (tmp_path / "envs").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--rounds", "0"], "argument --rounds: expected a positive integer, got '0'"),
    (["--models", "resnet"], "argument --models: expected mlp, cnn or mlp,cnn"),
    (["--backend", "numpy"], "argument --backend: invalid choice: 'numpy'")])
def test_gpu_check_usage_errors_are_one_line(args, fragment):
    rc, out, err = gpu_check(*args)
    assert (rc, out) == (2, "") and len(err.splitlines()) == 1
    assert err.startswith("error: gpu_check: ") and fragment in err, err


def test_gpu_check_names_a_backend_it_cannot_run_and_fails(machine, isolated, monkeypatch):
    """With a (faked) GPU, a backend passed with an interpreter lacking its framework and no
    --wheels is reported as not run, with what it lacks, and the check fails (exit 1)."""
    machine(smi=(0, H100))
    monkeypatch.setattr("tempfile.tempdir", str(isolated / "tmp"))
    (isolated / "tmp").mkdir()
    bare = isolated / "bare-python"  # this interpreter without its site-packages: no flax
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(0o755)
    rc, out, err = gpu_check("--python", f"flax={bare}", "--no-conformance")
    assert rc == 1, out + err
    assert out.startswith("GPU: nvidia-smi lists 1 usable GPU: 0: NVIDIA H100 80GB HBM3")
    assert f"\n== flax ({envs.discover()['flax'].framework})\n   not run: {bare} " in out
    assert "lacks flax, jax, jaxlib (pass --wheels DIR holding their wheels)" in out
    assert "\nFAILED: flax (logs kept in " in out


def test_gpu_check_layers_missing_packages_from_a_wheel_folder(tmp_path):
    """--wheels: what an interpreter lacks is installed from the folder alone into a scratch
    environment over it, whose own packages stay visible."""
    from benchmarks import gpu_check as script
    from tests.fakes.package_index import build_wheel
    (tmp_path / "wheels").mkdir()
    build_wheel(tmp_path / "wheels")
    assert script.missing_modules(PYTHON, ["harness_size_probe", "numpy"]) == \
        ["harness_size_probe"]
    python = script.layered(PYTHON, ["harness-size-probe"], tmp_path / "wheels",
                            tmp_path / "work")
    assert script.missing_modules(python, ["harness_size_probe", "numpy", "yaml"]) == []
    assert str(python).startswith(str(tmp_path / "work"))


def test_gpu_check_runs_again_from_a_layer_when_the_harness_lacks_a_package(
        machine, isolated, monkeypatch, capfd):
    """This interpreter lacking a package the harness needs (as the GPU machine lacks
    jsonschema): with --wheels, gpu_check layers it and runs itself again from there, with
    the same arguments (the second run here meets an nvidia-smi that fails, and says so)."""
    from benchmarks import gpu_check as script
    from tests.fakes.package_index import build_wheel
    machine(smi=(0, H100))
    monkeypatch.setattr(script, "HARNESS_NEEDS", {"harness_size_probe": "harness-size-probe"})
    monkeypatch.delenv(script.REEXEC, raising=False)
    wheels, bin_dir = isolated / "wheels", isolated / "bin"
    wheels.mkdir()
    bin_dir.mkdir()
    build_wheel(wheels)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'second run'\nexit 9\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    rc, out, _ = gpu_check("--wheels", wheels, "--no-conformance")
    child = capfd.readouterr()
    assert rc == 2
    assert out.startswith(f"harness: harness_size_probe from {wheels} in ")
    assert child.err == ("error: gpu_check: no usable NVIDIA GPU (nvidia-smi failed (exit "
                         "status 9): second run); nothing was checked\n")
    monkeypatch.setenv(script.REEXEC, "1")  # already the layer: never a second layer
    rc, out, err = gpu_check("--wheels", wheels)
    assert rc == 2 and "lacks harness_size_probe, which the harness needs" in err
