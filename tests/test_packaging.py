"""Packaging: setuptools reads pyproject.toml without a deprecation warning (issue 17, item 8)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_applies_without_warnings(monkeypatch):
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)   # setuptools resolves readme and package-dir from here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), os.fspath(ROOT / "pyproject.toml"))
    assert [str(w.message) for w in caught] == []
    assert dist.metadata.license_expression == "MIT"   # the SPDX form, not a {text = ...} table
