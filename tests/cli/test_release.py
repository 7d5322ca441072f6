"""The release a user installs: one version everywhere, an sdist and a wheel that pass
`twine check` and carry what the package needs, and (with the real models) the wheel
installed into a fresh virtual environment runs."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import venv
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

import costeer
from costeer._version import __version__

ROOT = Path(__file__).resolve().parents[2]


def test_one_version_everywhere(costeer_in_process):
    result = costeer_in_process("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"costeer {__version__}"
    assert costeer.__version__ == version("costeer") == __version__
    top = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(encoding="utf-8"), re.M)
    assert top and top.group(1) == __version__  # the changelog's newest entry is this version


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: this environment's setuptools, no download (the suite runs offline too)
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out),
                            str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    return out


def test_the_sdist_and_wheel_pass_twine_check_and_carry_the_package(dist):
    sdist, = dist.glob(f"costeer-{__version__}.tar.gz")
    wheel, = dist.glob(f"costeer-{__version__}-py3-none-any.whl")
    checked = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0 and checked.stdout.count("PASSED") == 2, checked.stdout + checked.stderr
    names = zipfile.ZipFile(wheel).namelist()
    assert "costeer/examples/profile.md" in names and "costeer/_version.py" in names
    assert {f"costeer/proxy/static/{f}" for f in ("index.html", "app.js", "style.css", "icon.svg")} <= set(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = zipfile.ZipFile(wheel).read(f"costeer-{__version__}.dist-info/METADATA").decode()
    assert f"Version: {__version__}" in metadata and "License-Expression: Apache-2.0" in metadata
    assert "Provides-Extra: hf" in metadata and "Provides-Extra: eval" in metadata
    assert not any(n.startswith(("tests/", "reports/")) for n in names)
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
    assert f"costeer-{__version__}/LICENSE" in members and f"costeer-{__version__}/CHANGELOG.md" in members


@pytest.mark.models
def test_the_wheel_installs_into_a_fresh_environment_and_generates(dist, tmp_path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    wheel, = dist.glob("*.whl")
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True,
                               timeout=1800)
    assert installed.returncode == 0, installed.stderr[-2000:]
    cli = env / "bin" / "costeer"
    shown = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=120)
    assert shown.stdout.strip() == f"costeer {__version__}"
    made = subprocess.run([str(cli), "generate", "--prompt", "Say hello.", "--context-text", "I am Ada.",
                           "--max-new-tokens", "4", "--json", "--no-context-cache"],
                          capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stderr[-2000:]
    assert '"new_tokens": ' in made.stdout
