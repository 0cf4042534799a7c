"""Reproducible installs: constraints.txt (written by scripts/make_constraints.py) pins every dependency of
the project at a version pyproject.toml's ranges allow, leaves torch to scripts/install.sh, and the README
names the tested versions of the main libraries as pinned."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (pyproject.toml is read as CI reads it)


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            out[canonicalize_name(name)] = version
    return out


def direct_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    texts = project["dependencies"] + [t for e in ("dev", "minilm") for t in project["optional-dependencies"][e]]
    return [Requirement(t) for t in texts]


def test_every_direct_dependency_but_torch_is_pinned_inside_its_range():
    p = pins()
    assert "torch" not in p and not any(n.startswith("nvidia-") for n in p)  # install.sh picks torch's build
    for req in direct_requirements():
        name = canonicalize_name(req.name)
        if name == "torch" or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        assert name in p, f"{req.name} is not pinned in constraints.txt (run python scripts/make_constraints.py)"
        assert req.specifier.contains(p[name], prereleases=True), f"{name}=={p[name]} is outside {req}"


def test_install_script_uses_the_pins_unless_asked_for_the_latest():
    text = (REPO / "scripts" / "install.sh").read_text()
    assert 'pip install -c constraints.txt -e ".[dev,minilm]"' in text and "INSTALL_LATEST" in text


def test_readme_names_the_tested_versions_as_pinned():
    readme = (REPO / "README.md").read_text()
    line = next((ln for ln in readme.splitlines() if ln.startswith("**Tested versions**")), None)
    assert line, "README.md has no '**Tested versions**' line"
    p = pins()
    for name in ("transformers", "trl", "accelerate", "deepspeed", "datasets", "peft"):
        m = re.search(rf"\b{name} (\d[\w.]*\w)", line)
        assert m and m.group(1) == p[name], f"README says {name} {m and m.group(1)}, constraints.txt {p[name]}"
