"""Every Python package in the tree is installed (a non-editable install would silently miss an unlisted one)."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = set()
    for package, top in config["package-dir"].items():  # e.g. "moeserve.training" = "training"
        for init in (ROOT / top).rglob("__init__.py"):
            on_disk.add(".".join([package, *init.parent.relative_to(ROOT / top).parts]))
    assert on_disk - listed == set(), f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"


def test_native_kernel_sources_are_package_data():
    """The C sources the native CPU kernels build from travel with a non-editable install."""
    import fnmatch

    from moeserve.kernels.native import SOURCES

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = setuptools["package-data"]["moeserve.kernels"]
    package = ROOT / setuptools["package-dir"]["moeserve.kernels"]
    needed = [p.relative_to(package).as_posix() for p in (package / "csrc").iterdir()]
    assert set(SOURCES) <= {Path(n).name for n in needed}
    for name in needed:
        assert any(fnmatch.fnmatch(name, g) for g in globs), f"{package / name} is not package data"


def test_images_copy_every_package_folder():
    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    for dockerfile in sorted((ROOT / "deploy" / "docker").glob("Dockerfile.*")):
        copied = {line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("COPY ")}
        missing = {f for f in folders if not any(f == c or f.startswith(f"{c}/") for c in copied)}
        assert missing == set(), f"{dockerfile.name} does not copy {sorted(missing)}"


def test_the_checkout_root_on_sys_path_shadows_no_installed_package():
    """`python -c` from the root puts the root first on sys.path: kernels/ must not stand in for Hugging Face's
    `kernels` package (transformers imports it), and children started there (Ray workers, torchrun, the engine core)
    import the engine."""
    import subprocess
    import sys

    assert not (ROOT / "kernels" / "__init__.py").exists()
    children = [
        "import transformers.integrations.hub_kernels, moeserve.kernels; "
        "import importlib.util as u; s = u.find_spec('kernels'); "
        "assert s is None or s.origin is None or 'site-packages' in s.origin, s.origin",
        "from moeserve import LLM; import moeserve.engine.core_process, moeserve.models.loader; "
        "import transformers.activations",
    ]
    for code in children:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
