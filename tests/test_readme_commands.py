"""Every command in the README's code blocks is checked, so a wrong example fails CI.

How each is checked, cheapest that still catches a wrong example:
- `megalite-train` (and `torchrun -m megalite.train`, `launch/torchrun.sh`): the overrides are
  composed into the typed config and checked against the world size the line starts, exactly as
  preflight and megalite-launch do; `--help` and `--cfg job` run.
- the commands on `runs/latest` (eval, generate, convert to-hf): run for real, in a scratch dir
  whose `runs/latest` links a tiny trained run, as `make demo` leaves it;
- megalite-plan: runs; megalite-launch and megalite-bench: run with `--dry-run`;
- every other megalite CLI (a GPU, a cluster or input files it does not have): each `--option`
  must be one its `--help` lists;
- `make X`: X is a target of the Makefile.
- `$ command` lines in text blocks: the output shown must be what the command prints;
- the `--cfg job` excerpt (yaml block): every value in it is the recipe's.
A line no rule covers fails the test: add a rule, or an entry in NOT_RUN with the reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_MODEL, compose, tiny_train_overrides

README = (REPO / "README.md").read_text()
# Other programs the README shows (setting up an environment, SLURM, watching files): not
# megalite's commands, so not checked here.
EXTERNAL = {"pip", "python", "python3", "echo", "docker", "enroot", "apptainer", "sbatch",
            "squeue", "scancel", "tail", "wandb", "lm_eval", "cat", "ls", "export", "cd", "git"}  # fmt: skip
# Lines that cannot be checked here, each with why; an entry that matches no line fails.
NOT_RUN = {
    "megalite-train -cd converted/conf": "needs a megalite-convert output: tests/interop runs it",
    "srun --nodes=4": "needs a SLURM cluster; the same bench job is the torchrun line above it",
}


@dataclass
class Command:
    line: str  # as the README writes it, continuation lines joined
    lang: str  # the block's language

    @property
    def words(self) -> list[str]:
        words = shlex.split(self.line, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # leading VAR=value
            words = words[1:]
        return words

    @property
    def env(self) -> dict[str, str]:
        m = re.match(r"^((?:[A-Z_]+=\S*\s+)+)", self.line)
        return dict(w.split("=", 1) for w in m.group(1).split()) if m else {}


def readme_commands() -> list[Command]:
    found = []
    for lang, body in re.findall(r"^```(\w+)\n(.*?)^```", README, re.S | re.M):
        if lang not in ("bash", "text"):
            continue
        text = re.sub(r"\\\n\s*", " ", body)
        for line in text.splitlines():
            line = line.strip()
            if lang == "text":  # only `$ command` lines; the rest is output
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if line and not line.startswith("#"):
                found.append(Command(line, lang))
    return found


COMMANDS = readme_commands()


def _output_after(command: Command) -> list[str]:
    """The lines a text block shows after `$ command`, up to the next `$` line or the end."""
    for body in re.findall(r"^```text\n(.*?)^```", README, re.S | re.M):
        lines = body.splitlines()
        for i, line in enumerate(lines):
            if line == f"$ {command.line}":
                out = []
                for rest in lines[i + 1 :]:
                    if rest.startswith("$ "):
                        break
                    out.append(rest)
                return out
    return []


# ----------------------------------------------------------------------------- running CLIs
def entry_points() -> dict[str, str]:
    setup = (REPO / "setup.py").read_text()
    return dict(re.findall(r'"(megalite-[\w-]+)=([\w.]+:\w+)"', setup))


def run_cli(prog: str, args: list[str]) -> tuple[int, str, str]:
    """The console script `prog` in this process: (exit status, stdout, stderr)."""
    module, func = entry_points()[prog].split(":")
    main = getattr(__import__(module, fromlist=[func]), func)
    old, sys.argv = sys.argv, [prog, *args]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    return (code or 0), out.getvalue(), err.getvalue()


_HELP: dict[tuple[str, str | None], str] = {}


def options_of(prog: str, sub: str | None) -> set[str]:
    if (prog, sub) not in _HELP:
        code, out, err = run_cli(prog, [*([sub] if sub else []), "--help"])
        assert code == 0, err
        _HELP[prog, sub] = out
    return set(re.findall(r"(?<![\w-])(--?[\w][\w-]*)", _HELP[prog, sub]))


def check_options(prog: str, args: list[str]) -> None:
    """Each `--option` of `args` (up to a bare `--`) is one `prog [sub] --help` lists."""
    sub = args[0] if args and re.fullmatch(r"[a-z][a-z-]*", args[0]) else None
    if sub is not None:  # a subcommand's help names it; a first positional argument does not
        options_of(prog, sub)
        if not _HELP[prog, sub].startswith(f"usage: {prog} {sub}"):
            sub = None
    known = options_of(prog, sub)
    for word in args[: args.index("--")] if "--" in args else args:
        if word.startswith("-") and word != "...":
            assert word.split("=")[0] in known, f"{prog} {sub or ''}: no option {word}"


# ----------------------------------------------------------------------------- train configs
def check_train_overrides(overrides: list[str], world_size: int) -> None:
    """What megalite-train does with the overrides before any work: compose, check degrees and
    batch arithmetic at the world size (ConfigError otherwise)."""
    from megalite.parallel.dims import ParallelDims, check_world_size

    sweeps = [o for o in overrides if "," in o.split("=", 1)[-1] and "[" not in o]
    fixed = [o for o in overrides if o not in sweeps]
    variants = [fixed]
    for sweep in sweeps:  # -m key=a,b: each value is one run
        key, values = sweep.split("=", 1)
        variants = [[*v, f"{key}={value}"] for v in variants for value in values.split(",")]
    for variant in variants:
        cfg = compose(variant)
        check_world_size(cfg, ParallelDims.from_config(cfg.parallel, world_size))


def check_train(command: Command, args: list[str], world_size: int = 1) -> None:
    if "--help" in args or "-h" in args:
        code, out, _ = run_cli("megalite-train", ["--help"])
        assert code == 0 and out.startswith("usage: megalite-train")
        return
    if command.lang == "text":  # `$ megalite-train ...` followed by the error it prints
        shown = _output_after(command)
        code, _, err = run_cli("megalite-train", args)
        assert code == 2, err
        for line in shown:
            assert line.removeprefix("megalite-train: error: ") in err, (line, err)
        return
    if "--cfg" in args:  # prints the composed config; no world size is involved
        code, out, err = run_cli("megalite-train", args)
        assert code == 0 and "model:" in out, err
        return
    check_train_overrides([a for a in args if a != "-m"], world_size)


def _nproc(words: list[str]) -> int:
    for i, w in enumerate(words):
        if w.startswith(("--nproc_per_node", "--nproc-per-node")):
            return int(w.split("=", 1)[1]) if "=" in w else int(words[i + 1])
    raise AssertionError(f"no --nproc_per_node in {words}")


# ----------------------------------------------------------------------------- the scratch dir
@pytest.fixture(scope="module")
def scratch(tiny_corpus, tmp_path_factory) -> Path:
    """A dir laid out as after `make demo`: runs/<run> with checkpoints and runs/latest. The
    dataset is two short documents, one held out, so `megalite-eval runs/latest` (the whole
    val split) takes a second."""
    from megalite.data.prepare import PrepareOptions, prepare
    from megalite.trainer import Trainer

    root = tmp_path_factory.mktemp("readme")
    lines = (tiny_corpus / "hamlet_gut.txt").read_text().splitlines()
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("\n".join(lines[:600]))
    (root / "corpus" / "b.txt").write_text("\n".join(lines[600:900]))
    data = root / "data"
    prepare(
        PrepareOptions(
            inputs=[str(root / "corpus")], out=str(data), seq_len=32, vocab_size=512,
            val_fraction=0.5,
        )
    )  # fmt: skip
    overrides = tiny_train_overrides(data, root / "runs" / "tiny-1", max_steps=2)
    # Room for the README's prompt + 100 new tokens.
    Trainer(compose([*TINY_MODEL, *overrides, "model.max_seq_len=256"])).fit()
    assert (root / "runs" / "latest").is_symlink()
    (root / "notes.txt").write_text("But soft, what light through yonder window breaks?\n" * 20)
    return root


def _runnable_here(args: list[str]) -> bool:
    return any(a.startswith("runs/latest") for a in args) and "cuda" not in args


@pytest.mark.parametrize("command", COMMANDS, ids=[c.line[:70] for c in COMMANDS])
def test_readme_command(command: Command, scratch: Path, monkeypatch):
    words = command.words
    if words[0] in ("python", "python3") and words[1] == "-m" and words[2].startswith("megalite."):
        # `python -m megalite.x ...` is the console script whose entry point is in megalite.x
        by_module = {target.split(":")[0]: prog for prog, target in entry_points().items()}
        words = [by_module[words[2]], *words[3:]]
    prog, args = words[0], words[1:]
    if any(command.line.startswith(prefix) for prefix in NOT_RUN):
        return
    monkeypatch.chdir(scratch)
    if prog in EXTERNAL:
        return
    if prog == "make":
        assert re.search(rf"^{args[0]}:", (REPO / "Makefile").read_text(), re.M), command.line
    elif prog == "megalite-train":
        check_train(command, args)
    elif prog == "launch/torchrun.sh":
        assert os.access(REPO / prog, os.X_OK)
        check_train_overrides(args, int(command.env.get("NPROC", 1)))
    elif prog == "torchrun":
        module = words[words.index("-m") + 1]
        rest = words[words.index("-m") + 2 :]
        if module == "megalite.train":
            check_train_overrides(rest, _nproc(words))
        else:
            assert module == "megalite.bench", command.line
            code, out, err = run_cli("megalite-bench", [*rest, "--dry-run"])
            assert code == 0, err
    elif prog in ("megalite-launch", "megalite-bench"):
        check_options(prog, args)
        if "..." in args:  # an abbreviated line: its options were checked
            return
        extra = [] if "--dry-run" in args else ["--dry-run"]
        if prog == "megalite-launch":  # --dry-run belongs before the overrides
            args = [*args[:1], *extra, *args[1:]]
        else:
            args = [*args, *extra]
        code, out, err = run_cli(prog, args)
        assert code == 0, err
        shown = _output_after(command) if command.lang == "text" else []
        if shown:  # the printed command, with this checkout's torchrun
            from megalite.launch import default_torchrun

            expected = [re.sub(r"\S*/torchrun ", default_torchrun() + " ", s) for s in shown]
            assert out.splitlines() == expected
    elif prog == "megalite-plan":
        code, out, err = run_cli(prog, args)
        assert code == 0, err
        lines = iter(out.splitlines())
        for shown in _output_after(command):  # each shown line, in order (more may follow)
            assert any(line.rstrip() == shown.rstrip() for line in lines), shown
    elif prog.startswith("megalite-"):
        check_options(prog, args)
        if _runnable_here(args):
            code, out, err = run_cli(prog, args)
            assert code == 0, err
    else:
        raise AssertionError(f"no rule checks this README line: {command.line}")


def test_every_not_run_entry_still_names_a_readme_line():
    for prefix in NOT_RUN:
        assert any(c.line.startswith(prefix) for c in COMMANDS), prefix


def test_the_recipe_excerpt_is_what_cfg_job_prints():
    from omegaconf import OmegaConf

    (excerpt,) = re.findall(r"^```yaml\n(.*?)^```", README, re.S | re.M)
    header = excerpt.splitlines()[0]
    m = re.match(r"# megalite-train (.*) --cfg job \(excerpt\)$", header)
    assert m, header
    shown = yaml.safe_load(excerpt)
    actual = OmegaConf.to_container(OmegaConf.structured(compose(m.group(1).split())))

    def subset(a: dict, b: dict, where: str) -> None:
        for key, value in a.items():
            assert key in b, f"{where}{key}"
            if isinstance(value, dict):
                subset(value, b[key], f"{where}{key}.")
            else:
                assert b[key] == value, (f"{where}{key}", value, b[key])

    subset(shown, actual, "")
