"""The built wheel carries megalite.kernels and the Hydra configs, and runs without the source."""

from __future__ import annotations

import os
import subprocess
import zipfile

from tests.conftest import PYTHON, REPO


def test_wheel_ships_kernels_conf_and_entry_points(tmp_path):
    subprocess.run(
        [
            PYTHON,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("megalite-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "megalite/kernels/reference.py" in names
    assert not any(n.startswith("kernels/") for n in names)  # never a top-level `kernels`
    for group in (
        "model/llama3_8b.yaml",
        "parallel/single.yaml",
        "experiment/cpu_demo.yaml",
        "config.yaml",
    ):
        assert f"megalite/conf/{group}" in names
    entry = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    assert (
        "megalite-train = megalite.train:main" in entry
        and "megalite-data = megalite.data.cli:main" in entry
    )

    # Installed away from the source tree, the package finds its own configs.
    target = tmp_path / "site"
    subprocess.run(
        [PYTHON, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run(
        [PYTHON, "-m", "megalite.train", "--cfg", "job", "model=llama3_70b"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "n_layers: 80" in out.stdout
    where = subprocess.run(
        [PYTHON, "-c", "import megalite.train as t; print(t.CONF_DIR)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert where.stdout.strip().startswith(str(target))


def test_dockerfile_pins_agree_with_setup_py():
    """The image installs the versions setup.py pins: a container and a bare-metal install run
    the same torch, torchvision and flash-attn (DeepSpeed comes from the extra itself)."""
    import re

    docker = (REPO / "docker" / "Dockerfile").read_text()
    setup = (REPO / "setup.py").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", docker, re.M))
    pins = dict(re.findall(r'"([\w-]+)==([\w.]+)"', setup))
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins["torchvision"]
    assert args["FLASH_ATTN_VERSION"] == pins["flash-attn"]
    # The base image and the NGC rule: tests/launch/test_docker.py.
    assert 'pip install ".[gpu,deepspeed]"' in docker
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
