"""The installed package: one top-level name, ``disparse_fx`` (the repository's ``passes/``
folder installs as ``disparse_fx.passes``), plus the ``disparse-fx`` console script."""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    pytest.importorskip("setuptools", minversion="77")
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools writes build/ and *.egg-info next to the sources
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "disparse_fx", "passes"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (ROOT / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(source)], check=True, capture_output=True, cwd=out)
    (path,) = out.glob("disparse_fx-*.whl")
    return path


def test_the_wheel_installs_disparse_fx_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"disparse_fx"}, sorted(top)
    assert "disparse_fx/passes/rules/registry.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/", "passes/")) for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "disparse-fx = disparse_fx.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_package_runs_outside_the_checkout(wheel, tmp_path):
    """Installed into a bare folder and imported from elsewhere: the lower layer is found as
    disparse_fx.passes and errors carry that module name."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import disparse_fx as dfx, disparse_fx.passes.slim as s; "
            "print(s.__file__); print(dfx.DisparseValueError.__module__)")
    # PYTHONPATH comes before site-packages (and the editable install's finder), so the
    # package imported is the installed copy
    run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    file, module = run.stdout.split()
    assert file.startswith(str(target / "disparse_fx" / "passes")), file
    assert module == "disparse_fx.passes.errors"
