"""Backend environments: discovered from backends/, reused while requirements.txt is unchanged,
rebuilt when it changes, and a failed install is an EnvError carrying the log's tail."""

from __future__ import annotations

import json

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
    """missing -> ready after ensure_env; a second call reuses it (no new log); editing
    requirements.txt makes it stale and the next call rebuilds it."""
    assert backend.env_state() == "missing"
    messages = []
    python = envs.ensure_env(backend, messages.append)
    assert python.exists() and backend.env_state() == "ready"
    assert any("creating" in m for m in messages)
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
