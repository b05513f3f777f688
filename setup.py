"""megalite: PyTorch-native LLM pretraining.

`kernels/` installs as `megalite.kernels`, `conf/` ships inside the package as `megalite/conf` and
`launch/` as `megalite/launch_templates` (package data), so an installed megalite finds its Hydra
configs and launch templates without the source tree.
"""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent

# Exact pins for the parts whose builds must match each other: torchvision is imported by
# mosaicml-streaming, and a torchvision that does not match the torch build fails to import.
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "triton",  # version pinned by torch itself
    "numpy>=1.26,<2.2",  # mosaicml-streaming's bound
    "mosaicml-streaming==0.13.0",
    "hydra-core==1.3.2",
    "omegaconf==2.3.0",
    "tokenizers>=0.21,<0.23",
    "tiktoken>=0.7",  # reads tiktoken BPE encoding files for `megalite-data prepare --tokenizer`
    "pyarrow>=15",  # parquet input
    "zstandard>=0.22",  # .jsonl.zst input
    "safetensors>=0.4",
    "wandb>=0.19",
    "rich>=13",
    "matplotlib>=3.8",
    "scipy>=1.11",  # megalite-scale fits (L-BFGS, Huber loss)
    "threadpoolctl>=3",  # pins BLAS to one thread in the scale fit's bootstrap
    "torchao==0.18.0",  # train.float8 (torchao.float8)
    "datasketch==2.0.0",  # MinHash + LSH near-duplicate removal
    "xxhash>=3",  # shingle hashes for MinHash and the decontamination n-grams
    "langid==1.1.6",  # language identification; its model ships inside the package
    "fasttext-numpy2-wheel==0.9.2",  # quality classifier (fastText), numpy-2 build
    "lm-eval==0.4.13",  # megalite-eval harness
    # lm-eval pulls `datasets`, whose newest releases want huggingface-hub 1.x, which
    # transformers 4.x and tokenizers 0.22 refuse: hold both at versions that agree.
    "huggingface-hub>=0.34,<1.0",
    "datasets>=2.16,<4.1",
]

EXTRAS = {
    "gpu": ["flash-attn==2.8.3"],
    "deepspeed": ["deepspeed==0.19.8"],
    "dev": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "ruff>=0.6",
        "transformers>=4.45,<5",
        "accelerate>=1.0",  # lm_eval's `hf` backend, the harness parity test's reference
        "moto[server]>=5",  # a local S3-compatible server for the object-storage tests
    ],
}


def _conf_files() -> list[str]:
    return sorted(str(p.relative_to(HERE / "conf")) for p in (HERE / "conf").rglob("*.yaml"))


setup(
    name="megalite",
    version="0.1.0",
    description="PyTorch-native pretraining of large language models, from one CPU to GPU clusters",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "megalite",
        "megalite.model",
        "megalite.data",
        "megalite.parallel",
        "megalite.interop",
        "megalite.scale",
        "megalite.kernels",
        "megalite.conf",
        "megalite.launch_templates",
    ],
    package_dir={
        "megalite": "megalite",
        "megalite.kernels": "kernels",
        "megalite.conf": "conf",
        "megalite.launch_templates": "launch",
    },
    package_data={
        "megalite.conf": _conf_files(),
        "megalite.launch_templates": ["torchrun.sh", "slurm.sbatch"],
    },
    include_package_data=False,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "megalite-train=megalite.train:main",
            "megalite-data=megalite.data.cli:main",
            "megalite-eval=megalite.cli_args:eval_main",
            "megalite-generate=megalite.cli_args:generate_main",
            "megalite-convert=megalite.cli_args:convert_main",
            "megalite-bench=megalite.cli_args:bench_main",
            "megalite-plan=megalite.cli_args:plan_main",
            "megalite-launch=megalite.launch:main",
            "megalite-gpu-check=megalite.cli_args:gpu_check_main",
            "megalite-scale=megalite.scale.cli:main",
        ]
    },
)
