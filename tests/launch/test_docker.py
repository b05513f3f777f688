"""docker/Dockerfile without Docker: the rule that broke the image before, checked on the parsed
file. NGC's PyTorch images (nvcr.io/nvidia/pytorch, 25.03 and later) pin their own torch in
/etc/pip/constraint.txt, so a Dockerfile that starts from one and installs megalite's pinned
torch fails at `pip install` (ResolutionImpossible). The base must be a CUDA image whose CUDA
matches the torch wheels', at a fixed tag; the pins themselves are checked against setup.py in
tests/test_packaging.py."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"

# The shape of the Dockerfile that broke: an NGC base plus megalite's torch pin.
NGC_WITH_PIN = """\
ARG NGC_PYTORCH=25.10-py3
FROM nvcr.io/nvidia/pytorch:${NGC_PYTORCH}
ARG TORCH_VERSION=2.14.1
RUN pip install "torch==${TORCH_VERSION}" \\
 && pip install --no-build-isolation "flash-attn==2.8.3"
"""


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def problems(text: str) -> list[str]:
    """What is wrong with a Dockerfile's base and torch install; [] when nothing is."""
    args: dict[str, str] = {}
    bases, pip_lines = [], []
    for word, rest in instructions(text):
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args.setdefault(key, value)
        elif word == "FROM":
            bases.append(expand(rest.split()[0], args))
        elif word == "RUN":
            pip_lines.append(expand(rest, args))
    found = []
    pins_torch = any(re.search(r"pip install[^&;]*[\"' ]torch==", r) for r in pip_lines)
    for base in bases:
        if base.startswith("nvcr.io/nvidia/pytorch") and pins_torch:
            found.append(
                f"{base} pins its own torch (/etc/pip/constraint.txt), so pip cannot install "
                "torch=="
            )
        name, _, tag = base.partition(":")
        if not tag or tag == "latest":
            found.append(f"base image {base} has no fixed tag")
        m = re.match(r"(\d+)\.(\d+)(?:\.\d+)?-", tag)
        index = re.search(r"--index-url \S*/cu(\d+)(\d)\b", " ".join(pip_lines))
        if name == "nvidia/cuda" and m and index and m.groups() != index.groups():
            found.append(
                f"base image CUDA {m.group(1)}.{m.group(2)} does not match the torch wheels' "
                f"cu{index.group(1)}{index.group(2)} (flash-attn is built against both)"
            )
    return found


def test_dockerfile_uses_a_cuda_base_that_can_take_the_pinned_torch():
    text = DOCKERFILE.read_text()
    assert problems(text) == []
    (base,) = [rest for word, rest in instructions(text) if word == "FROM"]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-devel-ubuntu\d\d\.\d\d", expand(base, args))
    assert '"torch==${TORCH_VERSION}"' in text


def test_the_rule_catches_the_dockerfile_that_broke():
    assert problems(NGC_WITH_PIN) == [
        "nvcr.io/nvidia/pytorch:25.10-py3 pins its own torch (/etc/pip/constraint.txt), so pip "
        "cannot install torch=="
    ]
    assert "has no fixed tag" in problems("FROM nvidia/cuda:latest\n")[0]
    mismatch = "FROM nvidia/cuda:12.8.1-devel-ubuntu24.04\nRUN pip install --index-url x/cu130 t\n"
    assert "does not match the torch wheels' cu130" in problems(mismatch)[0]


def test_the_image_build_refuses_a_base_with_a_pip_constraint_file():
    """The guard in the Dockerfile's torch RUN: with NGC's PIP_CONSTRAINT it stops with a clear
    message instead of a resolver error; without one it lets the install go on."""
    (guard,) = [
        rest.split(" && pip install")[0]
        for word, rest in instructions(DOCKERFILE.read_text())
        if word == "RUN" and "constraint.txt" in rest
    ]
    env = {"PATH": "/usr/bin:/bin", "TORCH_VERSION": "2.14.1", "CUDA_IMAGE": "nvcr.io/x"}
    ngc = subprocess.run(
        ["sh", "-c", guard],
        env={**env, "PIP_CONSTRAINT": "/etc/pip/constraint.txt"},
        capture_output=True,
        text=True,
    )
    assert ngc.returncode == 1
    assert "torch==2.14.1 cannot be installed there; use an nvidia/cuda devel image" in ngc.stderr
    clean = subprocess.run(["sh", "-c", guard], env=env, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
