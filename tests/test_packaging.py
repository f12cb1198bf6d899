"""What a wheel ships: every data file the code loads is package data, so a normal install works."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_data_file_is_package_data():
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("source tree not beside the tests")
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["moeplace"]
    data = ROOT / "moeplace" / "data"
    files = [p.relative_to(ROOT / "moeplace").as_posix() for p in data.rglob("*") if p.is_file()]
    assert files
    # setuptools' '**' matches any depth, including none: data/**/*.json covers data/x.json too.
    expanded = patterns + [p.replace("/**/", "/") for p in patterns if "/**/" in p]
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in expanded)]
    assert not missing, f"not shipped in a wheel: {missing}"


def test_installed_package_has_its_data():
    from importlib import resources

    root = resources.files("moeplace") / "data"
    for rel in ("hardware/h100-nvlink.json", "hardware/h100-ib.json", "hardware/h800-ib.json",
                "hardware/models.json"):
        assert (root / rel).is_file(), rel
    assert any(p.name.endswith(".parquet") for p in root.iterdir())
