"""What a new user and a GPU-cluster user meet in their first hour (issue 20), each with the
message they get asserted: a damaged checkpoint on resume, an impossible MFU, the CLIs' help,
a plan that does not fit the hours asked, demo settings on a large model, runs/latest.
(GPU-only backends on a CPU: tests/test_preflight_backends.py.)"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, compose, tiny_train_overrides


def run_train(args: list[str]) -> tuple[int, str]:
    """`megalite-train <args>` in this process: (exit status, stdout + stderr)."""
    from megalite import train

    old, sys.argv = sys.argv, ["megalite-train", *args]
    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
            train.run()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    return code, out.getvalue()


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory) -> Path:
    """A run of 8 steps with checkpoints at steps 4 and 8."""
    from megalite.trainer import Trainer

    run = tmp_path_factory.mktemp("first_hour") / "run"
    Trainer(compose(tiny_train_overrides(tiny_data, run, eval_every=0))).fit()
    names = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert names == ["step_00000004", "step_00000008"]
    return run


def _copy(finished: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(finished, run, symlinks=True)
    return run, run / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000008"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------- 1. a damaged checkpoint
def test_resume_auto_falls_back_past_a_truncated_dcp_shard(finished, tiny_data, tmp_path):
    run, step4, step8 = _copy(finished, tmp_path)
    _truncate(step8 / "__0_0.distcp")
    code, out = run_train(
        [*tiny_train_overrides(tiny_data, run, eval_every=0, max_steps=8), "train.resume=auto"]
    )
    assert code == 0, out
    assert "Traceback" not in out and "PytorchStreamReader" not in out
    assert f"checkpoint {str(step8)!r} (__0_0.distcp is truncated: " in out
    assert "train.resume=auto resumes from the previous good checkpoint step_00000004" in out
    assert f"resumed from {step4} at step 4" in out
    # The run went on from step 4 and rewrote step 8 whole.
    from megalite.resume import damage

    assert damage(step8) is None


def test_a_named_checkpoint_with_a_truncated_rank_file_is_refused_before_any_write(
    finished, tiny_data, tmp_path
):
    run, step4, step8 = _copy(finished, tmp_path)
    _truncate(step8 / "rank_00000.pt")
    before = files(run)
    # Another setting than the first run's: a resumed run would write config.resumed-*.yaml.
    args = tiny_train_overrides(tiny_data, run, eval_every=0, max_steps=12)
    code, out = run_train([*args, f"train.resume={step8}"])
    assert code == 2, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert f"checkpoint {str(step8)!r} is damaged (rank_00000.pt is not a readable" in lines[0]
    assert f"resume from the previous good checkpoint with train.resume={step4}" in lines[0]
    assert files(run) == before  # no config.resumed-*.yaml, nothing changed
    assert not list(run.glob("config.resumed-*"))


def test_resume_auto_with_every_checkpoint_damaged_names_each_and_writes_nothing(
    finished, tiny_data, tmp_path
):
    run, step4, step8 = _copy(finished, tmp_path)
    _truncate(step8 / "rank_00000.pt")
    (step4 / ".metadata").write_bytes(b"")
    before = files(run)
    args = tiny_train_overrides(tiny_data, run, eval_every=0, max_steps=12)
    code, out = run_train([*args, "train.resume=auto"])
    assert code == 2 and "Traceback" not in out, out
    assert "every checkpoint in" in out and "is damaged" in out
    assert "step_00000008' (rank_00000.pt" in out and "step_00000004' (.metadata cannot" in out
    assert files(run) == before


def test_a_flipped_byte_in_a_rank_file_fails_its_crc(finished, tmp_path):
    import struct
    import zipfile

    from megalite.resume import damage

    ckpt = tmp_path / "step"
    shutil.copytree(finished / "checkpoints" / "step_00000004", ckpt)
    path = ckpt / "rank_00000.pt"
    with zipfile.ZipFile(path) as zf:
        entry = max(zf.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    # The entry's bytes start after its local header (30 bytes + name + extra field).
    name_len, extra_len = struct.unpack(
        "<HH", data[entry.header_offset + 26 : entry.header_offset + 30]
    )
    data[entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))  # same size: only the CRC can tell
    assert damage(ckpt) == f"rank_00000.pt is damaged: entry {entry.filename} fails its CRC"


@pytest.fixture(scope="module")
def small_run(tiny_data, tmp_path_factory) -> tuple[int, str, Path]:
    """One short run, as `make demo` starts it (run dir runs/cpu_demo-<time>, relative to the
    cwd), with a peak far too low: (exit status, its output, the runs dir)."""
    root = tmp_path_factory.mktemp("small")
    args = tiny_train_overrides(tiny_data, Path("runs/cpu_demo-1"), max_steps=3, eval_every=0)
    old = os.getcwd()
    os.chdir(root)
    try:
        code, out = run_train([*args, "logging.peak_tflops=1e-9"])
    finally:
        os.chdir(old)
    return code, out, root / "runs"


# ---------------------------------------------------------------- 3. MFU over 100 %
def test_trainer_warns_once_when_mfu_exceeds_100_percent(small_run):
    code, out, _ = small_run
    assert code == 0, out
    warnings = [line for line in out.splitlines() if "exceeds 100 %" in line]
    assert len(warnings) == 1, out  # three logged steps, one warning
    assert "warning: MFU" in warnings[0] and "of the config peak 1e-09 TFLOP/s" in warnings[0]
    assert "set logging.peak_tflops" in warnings[0]


# ---------------------------------------------------------------- 4. runs/latest
def test_runs_latest_points_at_the_newest_run(small_run, tmp_path):
    from megalite.rundir import point_latest

    code, out, runs = small_run
    assert code == 0, out
    assert (runs / "latest").is_symlink() and os.readlink(runs / "latest") == "cpu_demo-1"
    assert (runs / "latest" / "summary.json").is_file()
    # Replaced atomically by the next run; a real directory called `latest` never is.
    (tmp_path / "a-1").mkdir()
    assert point_latest(tmp_path / "a-1") == tmp_path / "latest"
    point_latest(tmp_path / "a-2")
    assert os.readlink(tmp_path / "latest") == "a-2"
    (tmp_path / "other" / "latest").mkdir(parents=True)
    assert point_latest(tmp_path / "other" / "b") is None
    assert (tmp_path / "other" / "latest").is_dir()


# ---------------------------------------------------------------- 5. --help
def _help_in_a_fresh_process(module: str, argv: list[str], entry: str = "main") -> tuple[str, bool]:
    """(the help text, whether torch was imported), from `main()` as the console script calls
    it, with `argv` as the command line."""
    code = (
        "import sys, io, contextlib\n"
        f"sys.argv = {argv!r}\n"
        f"from {module} import {entry} as main\n"
        "out = io.StringIO()\n"
        "try:\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(out.getvalue())\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    res = subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert res.returncode == 0, res.stderr
    text, _, last = res.stdout.rstrip().rpartition("\n")
    return text, last == "TORCH"


def test_train_help_says_what_it_does_without_importing_torch():
    text, torch_loaded = _help_in_a_fresh_process("megalite.train", ["megalite-train", "--help"])
    assert not torch_loaded
    assert "powered by Hydra" not in text
    assert text.startswith("usage: megalite-train [--help] [--cfg job] [KEY=VALUE ...]")
    for group, option in [
        ("model", "llama3_8b"),
        ("parallel", "fsdp_tp"),
        ("experiment", "cpu_demo"),
        ("data", "shakespeare"),
    ]:
        assert f"\n  {group:<11}" in text and option in text, (group, option)
    assert "bench" not in text and "base_" not in text
    assert "train.resume=auto" in text and "--cfg job" in text
    assert "max_steps: 400" not in text  # no config dump
    from megalite.compose import CONF_DIR
    from megalite.train import GROUPS

    groups = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert groups - {"bench"} == set(GROUPS)  # a new group must be described in --help


def test_every_cli_answers_help_without_importing_torch():
    """The console scripts of setup.py (cli_args.py's entries for the CLIs that need torch):
    `--help`, and a subcommand's, print the command's usage with torch never imported."""
    cases = [
        ("megalite.cli_args", "eval_main", ["megalite-eval", "--help"], "usage: megalite-eval"),
        ("megalite.cli_args", "eval_main", ["megalite-eval", "harness", "-h"],
         "usage: megalite-eval harness"),
        ("megalite.cli_args", "eval_main", ["megalite-eval", "watch", "--help"],
         "usage: megalite-eval watch"),
        ("megalite.cli_args", "generate_main", ["megalite-generate", "--help"],
         "usage: megalite-generate"),
        ("megalite.cli_args", "convert_main", ["megalite-convert", "to-hf", "--help"],
         "usage: megalite-convert to-hf"),
        ("megalite.cli_args", "bench_main", ["megalite-bench", "--help"], "usage: megalite-bench"),
        ("megalite.cli_args", "plan_main", ["megalite-plan", "--help"], "usage: megalite-plan"),
        ("megalite.cli_args", "gpu_check_main", ["megalite-gpu-check", "--help"],
         "usage: megalite-gpu-check"),
        ("megalite.launch", "main", ["megalite-launch", "--help"], "usage: megalite-launch"),
        ("megalite.data.cli", "main", ["megalite-data", "--help"], "usage: megalite-data"),
        ("megalite.scale.cli", "main", ["megalite-scale", "--help"], "usage: megalite-scale"),
    ]  # fmt: skip
    for module, entry, argv, usage in cases:
        text, torch_loaded = _help_in_a_fresh_process(module, argv, entry)
        assert text.startswith(usage), (argv, text[:200])
        assert not torch_loaded, argv
    # The entries point there, and the parsers' constants are the modules' own.
    setup = (REPO / "setup.py").read_text()
    for prog, entry in [("megalite-eval", "eval_main"), ("megalite-plan", "plan_main"),
                        ("megalite-generate", "generate_main"), ("megalite-bench", "bench_main"),
                        ("megalite-convert", "convert_main"),
                        ("megalite-gpu-check", "gpu_check_main")]:  # fmt: skip
        assert f'"{prog}=megalite.cli_args:{entry}"' in setup
    from megalite import cli_args, devices, gpu_check, plan
    from megalite.interop import llama_hf

    assert cli_args.PEAK_PRECISIONS == devices.PEAK_PRECISIONS
    assert cli_args.EXPORT_DTYPES == tuple(sorted(llama_hf.DTYPES))
    assert gpu_check.SECTIONS == cli_args.GPU_CHECK_SECTIONS
    assert plan.INFERENCE_TOKENS_PER_PARAM == cli_args.INFERENCE_TOKENS_PER_PARAM


@pytest.mark.parametrize(
    "module, prog, needle",
    [
        ("megalite.evaluate", "megalite-eval", "or a text file (--text)."),  # not cut short
        ("megalite.generate", "megalite-generate", "--max-new-tokens MAX_NEW_TOKENS per prompt"),
        ("megalite.launch", "megalite-launch", "--nodes NODES number of nodes"),
    ],
)
def test_cli_help_text(module, prog, needle, capsys):
    import importlib

    main = importlib.import_module(module).main
    args = ["slurm", "--help"] if prog == "megalite-launch" else ["--help"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the width
    assert text.startswith(f"usage: {prog}") and needle in text


# ---------------------------------------------------------------- 6. a plan that does not fit
def test_plan_says_when_the_run_does_not_fit_the_hours_asked(capsys):
    from megalite.plan import main

    assert main(["--gpus", "8", "--gpu", "h100", "--hours", "24", "--model", "llama3_8b"]) == 0
    out = capsys.readouterr().out
    assert "does not fit the 24 h asked" in out
    assert "in 24 h: 4.72B tokens (0.588/param, --tokens 4.72e+09)" in out
    assert "or 273 GPUs (35 nodes of 8) would train the 161B tokens in 24 h" in out


# ---------------------------------------------------------------- 7. demo settings, large model
def test_demo_data_and_run_dir_on_a_large_model_are_warned_about():
    from megalite.demo_checks import demo_warnings

    cfg = compose(
        [
            "experiment=llama3_8b",
            "data.dir=data/shakespeare",
            "data.seq_len=128",
            "train.run_dir=runs/cpu_demo-20261202-170000",
        ]
    )
    found = demo_warnings(cfg)
    assert len(found) == 3, found
    assert found[0].startswith("data.dir=data/shakespeare is the CPU demo's corpus")
    assert "model llama3_8b (8.03B parameters" in found[0]
    assert found[1].startswith("data.seq_len=128 is the CPU demo's")
    assert found[2].startswith("train.run_dir=runs/cpu_demo-20261202-170000 is the CPU demo's")
    assert demo_warnings(compose(["experiment=cpu_demo"])) == []
    assert demo_warnings(compose(["experiment=llama3_8b"])) == []


def test_launch_prints_the_demo_warnings(capsys):
    from megalite.launch import main

    overrides = ["experiment=llama3_8b", "data.dir=data/shakespeare", "data.seq_len=128"]
    assert main(["local", "--nproc", "8", "--dry-run", "--", *overrides]) == 0
    err = capsys.readouterr().err
    assert "megalite-launch: warning: data.dir=data/shakespeare is the CPU demo's corpus" in err
    assert "megalite-launch: warning: data.seq_len=128 is the CPU demo's" in err


def test_trainer_prints_the_demo_warnings(small_run):
    # A small model in the demo's run dir: only the run-dir warning applies.
    code, out, _ = small_run
    assert code == 0, out
    assert "warning: train.run_dir=runs/cpu_demo-1 is the CPU demo's run dir" in out
    assert "warning: data.dir" not in out


def _bench_rows() -> list[dict]:
    common = {"world_size": 1, "peak_source": "measured", "peak_tflops": 0.2, "bench": "t",
              "device": "cpu", "git_sha": "abc", "reason": ""}  # fmt: skip
    return [
        {
            **common,
            "label": "debug s64",
            "status": "ok",
            "tokens_per_s_per_device": 1500.0,
            "mfu": 0.2,
            "hfu": 0.25,
        },
        {
            **common,
            "label": "debug s128",
            "status": "ok",
            "tokens_per_s_per_device": 2100.0,
            "mfu": 1.41,
            "hfu": 1.41,
        },
        {
            **common,
            "label": "debug triton",
            "status": "skipped",
            "reason": "model.attention=triton is a Triton kernel and needs a CUDA GPU",
        },
    ]


def test_bench_plot_marks_100_percent_keeps_the_legend_off_the_bars_and_shows_skips(tmp_path):
    from megalite.bench_report import figure, plot

    fig = figure(_bench_rows())
    fig.canvas.draw()
    ax1, ax2 = fig.axes
    assert [tuple(line.get_xdata()) for line in ax2.get_lines()] == [(100, 100)]
    legend = fig.legends[0]
    box = legend.get_window_extent()
    assert not any(box.overlaps(ax.get_window_extent()) for ax in (ax1, ax2))
    assert sorted(t.get_text() for t in legend.get_texts()) == ["100 % of peak", "HFU", "MFU"]
    skipped = [t.get_text() for t in ax2.texts]
    assert skipped == ["skipped: model.attention=triton is a Triton kernel and needs a CUDA GPU"]
    assert [t.get_text() for t in ax1.get_yticklabels()][2] == "debug triton x1"
    assert ax2.get_xlim()[1] >= 141  # the impossible bar is drawn whole, past the line
    assert plot(_bench_rows(), tmp_path / "r.png") and (tmp_path / "r.png").stat().st_size > 0
