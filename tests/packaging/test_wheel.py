"""The wheel as a user gets it: built from a copy of the checkout, installed (without dependencies) into a
folder outside it, and run from another folder by this interpreter, whose torch it shares.

What it must hold: ``qpasses`` (with the visualiser's scripts, styles and vendored layout engine) and
``qpasses_zoo``; no top-level ``tools`` or ``zoo``. What must work there: ``qpasses viz`` to HTML (even
without the zoo extra's packages), ``qpasses quantize`` of a small model, one line naming the extra where a
command needs the zoo and it is missing, and ``qpasses bench`` answering in one line that the benchmarks live
in a source checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Left out of the copy the wheel is built from: version control, virtual environments, earlier build output
# (setuptools would package a stale build/lib), caches and run outputs.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "runs", "out", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".ruff_cache", ".hypothesis", "qpasses_zoo")

TINY_MODEL = '''
from torch import nn


def tiny():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))
'''


def _has_build_backend() -> bool:
    """setuptools and wheel in this interpreter: the wheel then builds without fetching a build environment."""
    try:
        import setuptools  # noqa: F401
        import wheel  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel file, the folder it is installed into)."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    isolation = ["--no-build-isolation"] if _has_build_backend() else []
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--quiet", *isolation,
                            "-w", str(base / "dist")], cwd=source, capture_output=True, text=True, timeout=600)
    if built.returncode != 0:
        pytest.skip(f"`pip wheel` cannot build here: {built.stderr.strip().splitlines()[-1:]}")
    (wheel_file,) = (base / "dist").glob("qpasses-*.whl")
    site = base / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target",
                    str(site), str(wheel_file)], check=True, capture_output=True, timeout=300)
    return wheel_file, site


def _run(site: Path, *args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` with only the installed wheel on PYTHONPATH, from the folder beside it (not the checkout)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=site.parent, env=env, capture_output=True, text=True,
                          timeout=300)


def test_wheel_holds_the_packages_and_the_viewer_files(installed):
    wheel_file, _ = installed
    names = zipfile.ZipFile(wheel_file).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"qpasses", "qpasses_zoo"}
    viewer = ROOT / "qpasses" / "viz"
    shipped = [p.relative_to(ROOT).as_posix() for p in viewer.rglob("*")
               if p.is_file() and p.suffix in (".js", ".css") or p.parent.name == "vendor"]
    assert shipped and all(name in names for name in shipped), sorted(set(shipped) - set(names))
    for module in ("qpasses_zoo/recipes/resnet.py", "qpasses_zoo/data/cifar.py", "qpasses_zoo/models/lite0.py"):
        assert module in names


def test_installed_package_runs_outside_the_checkout(installed):
    _, site = installed
    where = _run(site, "-c", "import qpasses, qpasses_zoo, importlib.util as u; "
                             "print(qpasses.__file__); print(qpasses_zoo.__file__); "
                             "print(u.find_spec('tools'), u.find_spec('zoo'))")
    assert where.returncode == 0, where.stderr
    qpasses_file, zoo_file, missing = where.stdout.strip().splitlines()
    assert Path(qpasses_file).is_relative_to(site) and Path(zoo_file).is_relative_to(site)
    assert missing == "None None"


def test_quantize_from_the_wheel(installed):
    _, site = installed
    (site.parent / "tinymodel.py").write_text(TINY_MODEL)
    saved = site.parent / "tiny_int8.pt"
    # The `qpasses` script pip installed (sys.path[0] is its folder, not the current one, unlike `python -m`).
    quantize = _run(site, str(site / "bin" / "qpasses"), "quantize", "tinymodel:tiny", "--input-size", "16",
                    "--num-batches", "2", "--batch-size", "2", "--out", str(saved), "--json")
    assert quantize.returncode == 0, quantize.stderr
    summary = json.loads(quantize.stdout)
    assert summary["plan"][-1] == "Lower" and summary["sqnr_db_on_example"] > 15
    assert saved.stat().st_size > 0


# The zoo's dependencies (mlxtend, timm, scikit-learn, ...) come with the `zoo` extra; a plain install lacks them.
WITHOUT_ZOO_EXTRA = """
import sys
sys.modules["mlxtend"] = None  # importing it now fails, as where the zoo extra is not installed
from qpasses.cli import main
codes = [main(["list"]), main(["viz", "tinymodel:tiny", "--input-size", "16", "--out", "graph.html"]),
         main(["quantize", "tinymodel:tiny", "--input-size", "16", "--num-batches", "1", "--batch-size", "2"])]
print("exit codes", *codes)
"""


def test_viz_needs_no_zoo_and_what_does_says_so_in_one_line(installed):
    _, site = installed
    (site.parent / "tinymodel.py").write_text(TINY_MODEL)
    result = _run(site, "-c", WITHOUT_ZOO_EXTRA)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "exit codes 0 0 1" in result.stdout
    # The page inlines the viewer's files, read from the installed package: the vendored Graphviz among them.
    page = (site.parent / "graph.html").read_text()
    assert "<html" in page and "graphvizVersion" in page
    (line,) = result.stderr.strip().splitlines()
    assert "--calib photos needs qpasses' zoo extra (no module 'mlxtend')" in line
    assert "pip install 'qpasses[zoo]'" in line
    assert "models: listing the zoo's models needs qpasses' zoo extra" in result.stdout
    assert "passes:" in result.stdout and "  fusebn" in result.stdout


def test_bench_from_the_wheel_says_where_the_benchmarks_are(installed):
    _, site = installed
    result = _run(site, "-m", "qpasses", "bench", "ptq")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "source checkout" in line and "python -m tools.bench.NAME" in line
