"""The README's promises: every path in "Where things are" exists, its two commands are Make
targets, and CI runs exactly its test command."""

from __future__ import annotations

import re

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_every_path_in_where_things_are_exists():
    paths = re.findall(r"^- `([^`]+)`", section("Where things are"), re.M)
    assert len(paths) >= 15
    for required in (
        "megalite/trainer.py",
        "megalite/model/transformer.py",
        "megalite/parallel/parallelize.py",
        "kernels/",
        "megalite/data/prepare.py",
        "launch/torchrun.sh",
        "benchmarks/",
    ):
        assert required in paths
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing


def test_two_commands_are_make_targets_and_ci_runs_the_test_command():
    commands = re.findall(r"^(make \w+)", section("Two commands"), re.M)
    assert commands == ["make demo", "make test"]
    makefile = (REPO / "Makefile").read_text()
    for cmd in commands:
        assert re.search(rf"^{cmd.split()[1]}:", makefile, re.M)
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_config_groups_named_in_readme_exist():
    for group, name in re.findall(
        r"`(model|parallel|data|optim|logging|experiment)/` \(([^)]*)\)", README
    ):
        for preset in re.findall(r"`([\w]+)`", name):
            assert (REPO / "conf" / group / f"{preset}.yaml").is_file(), (group, preset)
