"""Backend environments: discovered from backends/, reused while requirements.txt is unchanged,
rebuilt when it changes, and a failed install is an EnvError carrying the log's tail."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import pytest

from harness import envs
from harness.envs import Backend, EnvError, UserError


@pytest.fixture
def backend(tmp_path, monkeypatch):
    """A backend folder of our own, its environment under tmp_path/envs."""
    monkeypatch.setenv("HARNESS_ENV_DIR", str(tmp_path / "envs"))
    folder = tmp_path / "backends" / "toy"
    folder.mkdir(parents=True)
    (folder / "requirements.txt").write_text("# nothing to install\n")
    return Backend("toy", folder, "Toy", {})


def test_builtin_backends_are_discovered_with_their_defaults():
    """torch and numpy are found, with `default` resolved from their backend.yaml."""
    found = envs.discover()
    assert {"numpy", "torch"} <= set(found)
    torch = found["torch"]
    assert torch.defaults["dense"]["weight"]["name"] == "kaiming_uniform"
    assert torch.defaults["dense"]["weight"]["a"] == pytest.approx(5 ** 0.5)
    assert torch.defaults["dense"]["bias"] == {"name": "fan_in_uniform", "scale": 1.0}
    assert found["numpy"].devices == ("cpu",) and torch.devices == ("cpu", "cuda")


def test_unknown_backend_is_a_user_error():
    """--backend with a name that has no folder names the known ones."""
    with pytest.raises(UserError, match="unknown backend 'nope'; known: .*torch"):
        envs.select(["nope"])


def test_environment_is_created_reused_and_rebuilt_when_requirements_change(backend):
    """missing -> ready after ensure_env (saying first that no size is declared for it); a
    second call reuses it (no new log); editing requirements.txt makes it stale and the next
    call rebuilds it."""
    assert backend.env_state() == "missing"
    messages = []
    python = envs.ensure_env(backend, messages.append)
    assert python.exists() and backend.env_state() == "ready"
    assert any("creating" in m for m in messages)
    assert messages[1].startswith("[setup] toy: no size declared for it ("  # said, not skipped
                                  f"{envs.display_path(backend.folder / 'backend.yaml')}: "
                                  "environment_size.cpu); each file's size follows as pip "
                                  "fetches it; ")
    stamp = json.loads((backend.env_dir / envs.STAMP).read_text())
    assert stamp["requirements_sha256"] == backend.fingerprint()["requirements_sha256"]

    messages.clear()
    assert envs.ensure_env(backend, messages.append) == python
    assert messages == []  # reused: nothing done, nothing said

    backend.requirements.write_text("# changed\n")
    assert backend.env_state() == "stale"
    envs.ensure_env(backend, messages.append)
    assert any("stale" in m for m in messages) and backend.env_state() == "ready"


def test_failed_install_is_an_env_error_with_the_log_tail(backend):
    """pip rejecting the requirements gives EnvError with pip's complaint; nothing half-built
    is left to be mistaken for a ready environment."""
    backend.requirements.write_text("this is not a requirement!\n")
    with pytest.raises(EnvError) as err:
        envs.ensure_env(backend, lambda m: None)
    assert "creating the toy environment failed" in str(err.value)
    assert "this is not a requirement" in str(err.value)  # from pip, via the log tail
    assert backend.env_state() == "missing" and not backend.env_dir.exists()


def test_python_override_must_be_an_interpreter(tmp_path):
    """--python NAME=PATH: unknown NAME, missing PATH and a bad form are user errors."""
    known = envs.discover()
    with pytest.raises(UserError, match="expected NAME=PATH"):
        envs.parse_python_overrides(["torch"], known)
    with pytest.raises(UserError, match="unknown backend 'tf'"):
        envs.parse_python_overrides([f"tf={tmp_path}"], known)
    with pytest.raises(UserError, match="no executable interpreter"):
        envs.parse_python_overrides([f"torch={tmp_path / 'python'}"], known)


@pytest.fixture
def package_index(tmp_path, monkeypatch):
    """A local index holding one wheel; pip reads no configuration and no cache of ours."""
    from tests.fakes.package_index import PackageIndex
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    for key in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "wheels").mkdir()
    index = PackageIndex(tmp_path / "wheels")
    yield index
    index.close()


def test_cuda_environment_states_its_size_first_then_each_fetch_and_the_disk_used(
        backend, package_index):
    """Provisioning a GPU build: the declared size (with its source) is said before pip
    fetches anything; each file pip fetches is named with the size pip announces and a
    running total against the declared download; the end says what the environment takes
    on disk. Tested with a local index and a 300 kB wheel instead of multi-GB CUDA wheels."""
    from tests.fakes.package_index import WHEEL_NAME
    (backend.folder / "requirements-cuda.txt").write_text(package_index.requirements())
    declared = envs.DeclaredSize("a measurement made for this test", download_gb=0.0003)
    gpu = dataclasses.replace(backend, sizes={"cuda": declared}).for_device("cuda")
    assert gpu.env_name == "toy-cuda" and gpu.size is declared
    said = []  # (message, requests the index had answered by then)
    python = envs.ensure_env(gpu, lambda m: said.append((m, list(package_index.requests))))

    assert subprocess.run([str(python), "-c", "import harness_size_probe as m; "
                           "assert m.VALUE == 42"]).returncode == 0
    messages = [m for m, _ in said]
    statement = next(i for i, m in enumerate(messages) if "about 0.0003 GB to download" in m)
    assert messages[statement].startswith(
        "[setup] toy-cuda: about 0.0003 GB to download (declared in "
        f"{envs.display_path(backend.folder / 'backend.yaml')}: a measurement made for this "
        "test); ")
    assert messages[statement].endswith(f" free in {envs.env_root()}")
    wheel_get = ("GET", f"/files/{WHEEL_NAME}")
    assert said[statement][1] == []  # nothing fetched yet, from anywhere
    assert wheel_get in package_index.requests  # ... and pip fetched it afterwards
    announced = package_index.wheel.stat().st_size // 1000  # pip's rounding, in kB
    fetch = [m for m in messages if "fetching" in m]
    assert fetch == [f"[setup] toy-cuda: fetching {WHEEL_NAME} ({announced} kB); 1 files, "
                     f"{announced:.1f} kB of about 300.0 kB so far"], messages
    assert "[setup] toy-cuda: installing 1 packages" in messages
    ready = messages[-1]
    assert ready.startswith("[setup] toy-cuda: ready in ")
    assert f"fetched 1 files ({announced:.1f} kB)" in ready
    assert ready.endswith(f"{envs.format_bytes(envs.disk_usage(gpu.env_dir))} on disk")


def test_pip_progress_reads_pip_lines_and_says_when_still_working(tmp_path, backend):
    """pip's fetch lines (PyPI's name-only form, another index's URL form, the cache) give
    one message each with a running total; nothing new for the heartbeat time gives a
    'still working' message."""
    log = tmp_path / "pip.log"
    log.write_text("Collecting torch==2.13.0\n"
                   "  Downloading torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl "
                   "(906.4 MB)\n"
                   "Downloading https://example.org/f/nvidia_cudnn_cu12-9.1.whl (664.8 MB)\n"
                   "  Using cached numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl (16.4 MB)\n"
                   "Installing collected packages: numpy, nvidia-cudnn-cu12, torch\n")
    messages = []
    follow = envs.PipProgress(dataclasses.replace(backend, sizes={"cpu": envs.DeclaredSize(
        "x", download_gb=2.8)}), log, messages.append, heartbeat_s=3600)
    follow()
    assert messages == [
        "[setup] toy: fetching torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl (906.4 MB); "
        "1 files, 906.4 MB of about 2.8 GB so far",
        "[setup] toy: fetching nvidia_cudnn_cu12-9.1.whl (664.8 MB); 2 files, 1.6 GB of about "
        "2.8 GB so far",
        "[setup] toy: from pip cache numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl "
        "(16.4 MB); 3 files, 1.6 GB of about 2.8 GB so far",
        "[setup] toy: installing 3 packages"]
    assert follow.files == 3 and follow.bytes == pytest.approx(1587.6e6)
    follow.heartbeat_s = 0
    follow()
    assert messages[-1].startswith("[setup] toy: still working (")
    assert messages[-1].endswith("3 files, 1.6 GB fetched; last: "
                                 "numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl)")


def test_declared_sizes_are_read_with_their_source(tmp_path):
    """Every built-in backend declares its CPU environment's size (and each GPU build its own)
    with a source; an entry without a number or a source is refused."""
    for b in envs.discover().values():
        assert b.size is not None and b.size.source, b.name
        if (b.folder / "requirements-cuda.txt").is_file():
            assert b.for_device("cuda").size is not None, b.name
    with pytest.raises(ValueError, match="give disk_gb or download_gb"):
        envs.DeclaredSize.read({"source": "nowhere"})
    with pytest.raises(KeyError):
        envs.DeclaredSize.read({"disk_gb": 1.0})
    with pytest.raises(ValueError, match="not a positive number"):
        envs.DeclaredSize.read({"disk_gb": "big", "source": "s"})


def test_every_backend_declares_its_defaults_for_the_layers_that_differ(tmp_path, monkeypatch):
    """Each built-in backend declares what `default` draws for every registry role that takes
    the spec's initializer, and its own layer_norm eps, GELU form and dropout rate, each with
    a source (Keras 1e-3, Flax 1e-6 and its tanh GELU); a malformed entry is a user error."""
    from backends import layers

    found = envs.discover()
    for b in found.values():
        for name, lt in layers.LAYERS.items():
            if name in b.unsupported.get("layers", {}):
                continue  # not built there: nothing drawn (backend.yaml says why)
            for role in lt.roles:
                if role.init is None:  # a buffer's init is fixed, not the framework's
                    assert role.name in b.defaults.get(name, {}), (b.name, name, role.name)
        for layer, field in [("layer_norm", "eps"), ("gelu", "approximate"),
                             ("dropout", "rate")]:
            value, source = b.option_defaults[layer][field]
            assert source.strip(), (b.name, layer, field)
    eps = {name: b.option_defaults["layer_norm"]["eps"][0] for name, b in found.items()}
    assert (eps["torch"], eps["keras"], eps["keras_jax"], eps["flax"], eps["gluon"]) == \
        (1e-5, 1e-3, 1e-3, 1e-6, 1e-5)
    assert found["flax"].option_defaults["gelu"]["approximate"][0] == "tanh"
    assert found["torch"].defaults["embedding"]["weight"] == {"name": "normal", "mean": 0.0,
                                                              "std": 1.0}
    monkeypatch.setattr(envs, "BACKENDS_DIR", tmp_path)
    for bad in ["{layer_norm: {eps: 1.0e-5}}", "{layer_norm: {epsilon: {value: 1, source: s}}}",
                "{lstm: {eps: {value: 1, source: s}}}", "{gelu: {approximate: {value: none}}}"]:
        folder = tmp_path / "toy"
        folder.mkdir(exist_ok=True)
        (folder / "backend.yaml").write_text(
            f"framework: Toy\noption_defaults: {bad}\ncheckpoint: {{format: npz, suffix: .npz}}\n"
            "memory: {baseline_mib: 100, bytes_per_parameter: 8, bytes_per_activation: 8, "
            "bytes_per_working: 8, per_layer_mib: 1, retained_per_spec_mib: 1}\n")
        with pytest.raises(UserError, match="option_defaults"):
            envs._load_backend(folder)


def test_the_torch_suites_torchvision_environment_is_a_flavor_with_the_backends_pins():
    """The torchvision checkpoint tests' environment is the torch backend's "torchvision"
    flavor: its own requirements file and folder (the backend's environment never holds
    torchvision), pinning the torch and numpy the backend pins, so the checkpoints it writes
    are the backend's torch's, plus torchvision and every other package pinned."""
    torch = envs.select(["torch"])[0]
    flavor = dataclasses.replace(torch, flavor="torchvision")
    assert flavor.requirements.name == "requirements-torchvision.txt"
    assert flavor.env_name == "torch-torchvision" and flavor.env_dir != torch.env_dir

    def pins(path):
        lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
        return dict(ln.split("==") for ln in lines if ln)

    backend, tv = pins(torch.requirements), pins(flavor.requirements)
    assert {k: tv.get(k) for k in backend} == backend
    assert set(tv) - set(backend) == {"torchvision", "pillow"} and "torchvision" not in backend
    assert flavor.size is not None and flavor.size.disk_gb
