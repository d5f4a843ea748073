"""Packaging a user can trust: the built wheel installs and works outside the checkout.

The slow test builds the wheel (``python -m build --wheel --no-isolation``: no download),
installs it into a fresh virtual environment in a temporary folder and, from there, runs the
README's engine snippet and the console script. The new environment sees this one's
site-packages through a path entry (so torch is not downloaded again) but not its editable
install of metagrad_rl, so what is imported is the wheel's copy; the wheel's declared
dependencies are checked against what that environment imports.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

import metagrad_rl

ROOT = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")


def readme_engine_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## The meta-gradient engine")
    return text[start:].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_version_is_set_in_one_place_and_the_files_a_user_needs_exist():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    attr = meta["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "metagrad_rl.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+", metagrad_rl.__version__)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{metagrad_rl.__version__}]" in changelog
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert meta["project"]["license"] == "MIT" and meta["project"]["license-files"] == ["LICENSE"]
    assert (ROOT / "metagrad_rl" / "py.typed").is_file()


def test_project_urls_are_real_addresses_only():
    """No placeholder (example.org, your-org, TODO) in ``[project.urls]``: a URL is listed only
    once it is true, so Homepage/Source/Documentation wait for a public host."""
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert urls["Paper"] == "https://proceedings.mlr.press/v124/stadie20a.html"
    for label, url in urls.items():
        assert re.fullmatch(r"https://[a-z0-9.-]+\.[a-z]{2,}(/\S*)?", url), (label, url)
        bad = ("example.", "your-", "todo", "xxx", "localhost", "127.0.0.1", "placeholder")
        assert not any(b in url.lower() for b in bad), (label, url)


CHECK_DEPENDENCIES = """
import importlib.metadata as md, sys
from packaging.requirements import Requirement
missing = []
for line in md.requires("metagrad_rl") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an optional extra
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(f"{req} (not installed)")
        continue
    if not req.specifier.contains(version, prereleases=True):
        missing.append(f"{req} (have {version})")
print("missing:", missing)
sys.exit(1 if missing else 0)
"""


@pytest.mark.slow
def test_the_built_wheel_installs_and_runs_the_readme_engine_snippet(tmp_path):
    src = tmp_path / "src"  # a copy: the build's scratch folders stay out of the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "metagrad_rl", src / "metagrad_rl", ignore=IGNORED)
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)]
    subprocess.run([*build, str(src)], check=True, capture_output=True, timeout=600)
    (wheel,) = dist.glob("metagrad_rl-*.whl")
    assert wheel.name.startswith(f"metagrad_rl-{metagrad_rl.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "metagrad_rl/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith("/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names)
    (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    metadata = zipfile.ZipFile(wheel).read(meta_name).decode()
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    for label, url in urls.items():
        assert f"Project-URL: {label}, {url}" in metadata

    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # this environment's packages (torch, torchopt, ...) as a plain path: .pth files there --
    # the editable install of metagrad_rl among them -- are not processed
    Path(site, "host_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)]
    subprocess.run(pip, check=True, capture_output=True, timeout=600)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    snippet = readme_engine_snippet()
    script = (
        "import metagrad_rl, pathlib\n"
        f"assert pathlib.Path(metagrad_rl.__file__).is_relative_to({str(venv)!r}), "
        "metagrad_rl.__file__\n"
        f"{snippet}\nassert report.passed, report\nprint('snippet ok', metagrad_rl.__version__)\n"
    )
    run = subprocess.run(
        [str(py), "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"snippet ok {metagrad_rl.__version__}" in run.stdout

    deps = subprocess.run(
        [str(py), "-c", CHECK_DEPENDENCIES], cwd=work, env=env, capture_output=True, text=True
    )
    assert deps.returncode == 0, deps.stdout + deps.stderr
    cli = subprocess.run(
        [str(venv / "bin" / "metagrad-rl"), "train", "--help"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0 and "--lr" in cli.stdout, cli.stderr
