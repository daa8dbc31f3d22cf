"""The offline GPU install line of docs/gpu.md, run as written in a fresh virtual environment that
sees this environment's packages (as a GPU image has torch and the rest preinstalled) and
reaches no package index: keyreid must import from the clone afterwards, and the GPU check's
help and the kernel tests must run from that install."""
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A proxy nobody listens on: anything pip tried to download would fail at once.
DEAD_PROXY = "http://127.0.0.1:9"


def gpu_install_command() -> str:
    """The pip part of docs/gpu.md's offline GPU line (before its '&&')."""
    lines = [line for line in (REPO / "docs" / "gpu.md").read_text().splitlines()
             if line.startswith("python3 -m pip install") and "--no-index" in line]
    assert len(lines) == 1, f"expected one offline GPU install line in docs/gpu.md, found {lines}"
    return lines[0].split("&&")[0].strip()


def parent_site_directories() -> list:
    """This interpreter's site-packages, where its packages (torch, numpy, pip, setuptools) live."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def make_venv(root: Path) -> dict:
    """A venv under ``root`` that sees this environment's packages as plain path entries: their
    .pth files (an editable keyreid installed there among them) stay unprocessed, so keyreid can
    come only from the install under test. Returns the environment to run its python in."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    bin_dir = root / "bin"
    site = subprocess.run([str(bin_dir / "python3"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    (Path(site) / "_parent_environment.pth").write_text("\n".join(parent_site_directories()) + "\n")
    env = {name: value for name, value in os.environ.items()
           if name not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(root),
               PIP_CONFIG_FILE=os.devnull,          # none of this machine's indexes or find-links
               HTTP_PROXY=DEAD_PROXY, HTTPS_PROXY=DEAD_PROXY, http_proxy=DEAD_PROXY, https_proxy=DEAD_PROXY)
    return env


def run(command, env, cwd, timeout=120):
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          shell=isinstance(command, str))


IMPORT_CHECK = ("import importlib.metadata, keyreid.kernels, keyreid.export, keyreid.runtime; "
                "print(keyreid.kernels.__file__); print(keyreid.export.__file__); "
                "print(keyreid.runtime.__file__); print(importlib.metadata.distribution('keyreid').locate_file(''))")


def test_readme_offline_gpu_install_line_installs_keyreid_with_nothing_to_download(tmp_path):
    venv = tmp_path / "venv"
    env = make_venv(venv)
    elsewhere = tmp_path / "elsewhere"          # not the clone: imports must go through the install
    elsewhere.mkdir()
    before = run(["python3", "-c", "import keyreid"], env, elsewhere)
    assert before.returncode != 0 and "No module named 'keyreid'" in before.stderr, \
        "keyreid is importable before the install, so the test could not tell which install it uses"

    install = run(gpu_install_command(), env, REPO, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr

    imported = run(["python3", "-c", IMPORT_CHECK], env, elsewhere)
    assert imported.returncode == 0, imported.stderr
    kernels, export, runtime, installed_at = imported.stdout.split()
    assert (Path(kernels), Path(export), Path(runtime)) == (
        REPO / "kernels" / "__init__.py", REPO / "export" / "__init__.py", REPO / "runtime" / "__init__.py")
    assert Path(installed_at).resolve().is_relative_to(venv.resolve())

    help_text = run(["python3", "benchmarks/gpu_check.py", "--help"], env, REPO)
    assert help_text.returncode == 0 and help_text.stdout.startswith("usage:"), help_text.stderr

    # The kernel tests; gpu_check's model run on the CPU (30 s) is not one of them.
    tests = run(["python3", "-m", "pytest", str(REPO / "tests" / "test_cuda_kernel.py"), "-q",
                 "-p", "no:cacheprovider", "-k", "not writes_its_results"], env, elsewhere, timeout=600)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert re.search(r"\d+ passed", tests.stdout)


def test_pyproject_declares_the_setuptools_build_backend_and_its_minimum():
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^build-backend = "setuptools\.build_meta"$', text, re.M)
    minimum = re.search(r'^requires = \["setuptools>=([\d.]+)"\]$', text, re.M).group(1)
    setuptools = pytest.importorskip("setuptools")
    installed = tuple(int(part) for part in re.findall(r"\d+", setuptools.__version__)[:2])
    assert installed >= tuple(int(part) for part in minimum.split(".")), \
        f"setuptools {setuptools.__version__} here is older than the {minimum} an offline install needs"


def test_setup_finds_every_package_folder_including_new_subfolders(tmp_path):
    """setup.py run on a copy of the layout with one new subfolder: it becomes a subpackage."""
    import shutil
    for name in ("setup.py", "README.md", "keyreid/__init__.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    for folder in ("kernels", "export", "runtime", "runtime/backends"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "runtime" / "__pycache__").mkdir()          # no __init__.py: not a package
    code = ("import runpy, sys, setuptools\n"
            "setuptools.setup = lambda **kwargs: print(' '.join(kwargs['packages']))\n"
            "sys.argv = ['setup.py']\n"
            "runpy.run_path('setup.py', run_name='__main__')\n")
    packages = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              check=True, timeout=60).stdout.split()
    assert sorted(packages) == ["keyreid", "keyreid.export", "keyreid.kernels", "keyreid.runtime",
                                "keyreid.runtime.backends"]
