"""CI installs the test dependencies pinned (.ci/constraints.txt), so that a release of one
cannot turn CI red: every dev requirement must have its pin there, inside its own range."""

from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f".ci/constraints.txt: {line!r} is not name==version"
            found[canonicalize_name(name)] = version
    return found


def test_every_dev_requirement_is_pinned_within_its_range():
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    pinned = pins()
    for text in dev:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} (a dev requirement) has no pin in .ci/constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"{req.name}=={pinned[name]} is outside {req.specifier}"
        )


def test_the_readme_and_ci_install_with_the_constraints():
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if '".[dev]"' in line)
    command = line[line.index("pip install torch") :]  # after the venv's creation, which .ci/run does itself
    assert "-c .ci/constraints.txt" in command
    assert command in (ROOT / ".ci" / "run").read_text(), "CI must run the README's test command verbatim"
