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
    needed = [p.relative_to(ROOT / "kernels").as_posix() for p in (ROOT / "kernels" / "csrc").iterdir()]
    assert set(SOURCES) <= {Path(n).name for n in needed}
    for name in needed:
        assert any(fnmatch.fnmatch(name, g) for g in globs), f"kernels/{name} is not package data"


def test_images_copy_every_package_folder():
    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    for dockerfile in sorted((ROOT / "deploy" / "docker").glob("Dockerfile.*")):
        copied = {line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("COPY ")}
        assert folders - copied == set(), f"{dockerfile.name} does not copy {sorted(folders - copied)}"
