"""What `pip install vitflow` gives a user: the wheel built from this tree carries the example
jobs, py.typed and the LICENSE; installed into a fresh venv (no editable checkout on its path)
`vitflow init` + `vitflow embed --dry-run` work; pyproject.toml has ranges, constraints.txt
the exact versions `make install` uses, inside those ranges; `make install TORCH=cpu` asks
PyTorch's CPU index for torch; `import vitflow` and `vitflow.examples` do not load torch.

The fresh venv gets the dev venv's third-party packages through a .pth line naming its
site-packages: a directory added that way is put on sys.path, but its own .pth files (the
editable install's finder among them) are not run, so `vitflow` can only come from the wheel.
Nothing is downloaded.
"""

from __future__ import annotations

import email
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXAMPLES = sorted((REPO / "vitflow" / "examples").glob("*.yaml"))
TRAIN_ONLY = {"scikit-learn", "matplotlib", "faiss-cpu", "mlflow-skinny", "boto3"}
EXTRA_MODULES = ("sklearn", "matplotlib", "faiss", "mlflow", "boto3")  # what they are imported as


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("PYTHONPATH", None)  # nothing may put the checkout on the fresh venv's path
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd, cwd, timeout=120, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert r.returncode == 0, f"{cmd}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="vitflow-packaging-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def wheel(scratch) -> Path:
    """A wheel built (no build isolation: no network) from a copy of what the wheel is made
    of, so the build's build/ and egg-info never touch the shared checkout."""
    src = scratch / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(
        REPO / "vitflow", src / "vitflow", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    out = scratch / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", out, src],
        cwd=scratch,
        timeout=180,
    )
    (whl,) = out.glob("vitflow-*.whl")
    return whl


@pytest.mark.timeout(240)
def test_wheel_carries_examples_types_and_license(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for path in EXAMPLES:
            arc = f"vitflow/examples/{path.name}"
            assert arc in names, f"{arc} is not in the wheel"
            assert z.read(arc) == path.read_bytes()
        assert "vitflow/examples/__init__.py" in names
        assert "vitflow/py.typed" in names
        (lic,) = [
            n for n in names if re.fullmatch(r"vitflow-[^/]+\.dist-info/(licenses/)?LICENSE", n)
        ]
        assert z.read(lic) == (REPO / "LICENSE").read_bytes()
        assert b"Apache License" in z.read(lic) and b"the vitflow authors" in z.read(lic)
        assert {n.split("/")[0] for n in names} <= {
            "vitflow",
            wheel.name.split("-py3")[0] + ".dist-info",
        }
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        msg = email.message_from_bytes(z.read(meta))
    assert msg["License-Expression"] == "Apache-2.0"
    assert {"analysis", "train", "cloud", "dev"} <= set(msg.get_all("Provides-Extra"))
    for line in msg.get_all("Requires-Dist"):
        req = Requirement(line)
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"exact pin: {line}"
        if canonicalize_name(req.name) in TRAIN_ONLY:
            assert req.marker and "extra" in str(req.marker), f"{line} should be in an extra"


@pytest.fixture(scope="module")
def fresh_venv(scratch, wheel) -> Path:
    """A new venv with only the wheel installed, the dev venv's third-party packages on its
    path, and the [train]/[cloud] extras hidden, as after a plain `pip install vitflow`."""
    venv = scratch / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=scratch)
    py = venv / "bin" / "python"
    fresh_site = _run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], scratch)
    fresh_site = Path(fresh_site.stdout.strip())
    dev_sites = dict.fromkeys(site.getsitepackages() + [sysconfig.get_path("platlib")])
    (fresh_site / "vitflow-dev-venv.pth").write_text("".join(f"{p}\n" for p in dev_sites))
    # A None entry in sys.modules makes `import sklearn` fail as if it were not installed.
    (fresh_site / "vitflow-no-extras.pth").write_text(
        f"import sys; sys.modules.update(dict.fromkeys({EXTRA_MODULES!r}))\n"
    )
    # pip (found through the first line) installs into the interpreter it runs under.
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=scratch)
    work = scratch / "work"
    work.mkdir()
    return venv


@pytest.mark.timeout(120)
def test_fresh_venv_runs_the_installed_wheel(fresh_venv, scratch):
    code = (
        "import sys, vitflow\n"
        "import vitflow.embed, vitflow.reindex, vitflow.loading, vitflow.index_table\n"
        "import vitflow.submit, vitflow.cli, vitflow.dryrun, vitflow.analysis\n"
        "print(vitflow.__file__, vitflow.__version__)\n"
        "import sklearn\n"
    )
    r = _run([fresh_venv / "bin" / "python", "-c", code], scratch / "work", check=False)
    # the embed, reindex and load modules import without the extras; the extras are hidden
    assert r.returncode == 1 and "ModuleNotFoundError" in r.stderr and "sklearn" in r.stderr, (
        r.stderr
    )
    where, version = r.stdout.split()
    assert Path(where).resolve().is_relative_to(fresh_venv.resolve()), f"vitflow from {where}"
    assert version == PYPROJECT["project"]["version"]


@pytest.mark.timeout(120)
def test_fresh_venv_init_then_dry_run(fresh_venv, scratch):
    work, cli = scratch / "work", fresh_venv / "bin" / "vitflow"
    r = _run([cli, "init", "--list"], work)
    assert set(r.stdout.split()) == {p.stem for p in EXAMPLES}

    r = _run([cli, "init", "job.yaml"], work)
    job = work / "job.yaml"
    assert job.read_text() == (REPO / "vitflow" / "examples" / "embed.yaml").read_text()
    job.write_text(job.read_text() + "# my edit\n")
    r = _run([cli, "init", "job.yaml"], work, check=False)
    assert r.returncode == 1 and "already exists" in r.stderr, r.stderr
    assert job.read_text().endswith("# my edit\n")

    images = work / "imgs"
    for i, cls in enumerate(["cat", "cat", "dog"]):
        (images / cls).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 32), (40 * i, 90, 160)).save(images / cls / f"{i}.png")
    dry = [cli, "embed", "job.yaml", "--dry-run", "--set", f"source.uri={images}"]
    r = _run(dry + ["--random-weights"], work)
    assert "checked, nothing started" in r.stdout, r.stdout
    assert re.search(r"listed\s*:\s*3 files", r.stdout), r.stdout
    assert "vit_small_patch14_dinov2.lvd142m" in r.stdout and "random" in r.stdout, r.stdout
    assert not (work / "embeddings").exists(), "a dry run writes nothing"

    # Without a choice of weights the template is refused, naming the three ways.
    r = _run(dry, work, check=False)
    assert r.returncode == 1 and "model.weights: random" in r.stderr, r.stderr


@pytest.mark.timeout(120)
def test_fresh_venv_train_without_the_extra_names_it(fresh_venv, scratch):
    job = REPO / "vitflow" / "examples" / "simo2-digits.yaml"
    r = _run([fresh_venv / "bin" / "vitflow", "train", job], scratch / "work", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "pip install 'vitflow[train]'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert m, f"constraints.txt: not a name==version pin: {line!r}"
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_ranges_in_pyproject_exact_versions_in_constraints():
    project = PYPROJECT["project"]
    pins = _pins()
    assert "vitflow" not in pins
    reqs = [Requirement(r) for r in project["dependencies"]]
    for lines in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in lines if not r.startswith("vitflow")]
    for req in reqs:
        assert not any(s.operator == "==" for s in req.specifier), f"pyproject pins {req}"
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt has no pin for {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req}"
        )
    # the pins that keep the resolve fast and the cluster in step stay exact
    for name in ("torch", "torchvision", "ray", "boto3", "botocore"):
        assert name in pins
    core = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert not core & TRAIN_ONLY, "training and cloud tools belong in extras"
    assert set(project["optional-dependencies"]) >= {"analysis", "train", "cloud", "dev"}


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("torch", ["", "cpu"])
def test_make_install_torch_flavour(tmp_path, torch):
    """`make -n` prints the install commands for a venv that does not exist yet."""
    args = ["make", "-n", "-C", REPO, "install", f"VENV={tmp_path / 'venv'}"]
    r = _run(args + ([f"TORCH={torch}"] if torch else []), REPO)
    pip_lines = [line for line in r.stdout.splitlines() if " -m pip install " in line]
    main = pip_lines[-1]
    assert "-e '.[dev]' -c constraints.txt" in main
    if torch:
        assert len(pip_lines) == 2
        # and it checks, from the metadata, that pip did not fall back to another index's build
        assert f"not the {torch} build" in r.stdout
        assert re.search(
            r"pip install -q --no-deps torch torchvision -c constraints.txt "
            rf"--index-url https://download.pytorch.org/whl/{torch}\b",
            pip_lines[0],
        ), pip_lines[0]
    else:
        assert len(pip_lines) == 1 and "download.pytorch.org" not in r.stdout


def test_light_imports_do_not_load_torch():
    code = (
        "import sys, vitflow, vitflow.examples, vitflow.cli\n"
        "vitflow.examples.list_examples(); vitflow.examples.example_text()\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'ray', 'torchvision', 'pyarrow', 'pandas')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    r = _run([sys.executable, "-c", code], REPO, timeout=60)
    assert r.stdout.strip() == "", f"importing vitflow loaded {r.stdout.strip()}"
