"""Every shell command in README.md and docs/*.md is either run here at tiny settings or marked with what it needs.

Run: .venv/bin/python -m pytest tests/docs -q   (about a minute on 2 cores)

Where commands are read
-----------------------
Fenced blocks whose info string starts with `bash`, `sh`, `shell` or `console`. In bash/sh/shell blocks every
line that is not blank and not a comment is a command; a line ending in `\\` continues on the next one. In console
blocks only lines starting with `$ ` are commands and the other lines are output. Other blocks (`text`, `python`,
no info string) are not read: put output and file listings there.

The marking convention
----------------------
A command that needs what this machine or this test cannot give ends with a comment (after the last
continuation line):

    some command --with args  # needs: slurm data

The words after `needs:` come from NEEDS:

    slurm    a SLURM cluster (sbatch, squeue, scancel, a SLURM_CONF)
    gpu      a CUDA GPU
    nodes    several machines
    data     a raw dataset that is not on this machine (CIFAR, Tiny ImageNet, ImageNet-LT, ...)
    network  a download
    root     root rights (apt-get, starting daemons)
    long     minutes to hours as written

What the test does with each command
------------------------------------
`test_every_command_is_classified` fails, listing them, on commands that none of these rules covers.

- `python -m data_prep.build | data_prep.extract_features | csdm_dist.distill | csdm_dist.evaluate |
  csdm_dist.pretrain | csdm_dist.export | csdm_dist.teacher` (`python`, `python3` or `.venv/bin/python`): run in
  this process with runpy, as `python -m` runs them, and pass when they exit with 0. Skipped when marked.
- `python launch/submit.py`: `cluster=local` (the default) and `cluster=debug` run like the modules above. A
  SLURM cluster (`cluster=slurm`, `cluster=imagenet_lt`) runs as a dry run (`cluster.dry_run=true` appended),
  whatever the command is marked with, unless it needs `root`.
- `torchrun --nproc_per_node=N -m <module> ...`: a subprocess, with N capped at 2 and a free local port
  (`--master_addr=127.0.0.1 --master_port=<free>`) unless the command gives them. `--nnodes` > 1 must be marked
  `nodes`.
- `make <target> [VAR=value]`: `make -n <target>` in the repository (prints the recipe, runs nothing).
- `benchmarks/speed.py`: run in this process at tiny flags (TINY_FLAGS) unless marked `gpu`. The other
  benchmark scripts must be marked `long` or `gpu`; their flags are parsed by the script's own `parse_args`,
  nothing is run.
- `.venv/bin/tensorboard ...`: the venv's `tensorboard` must exist (not run). A bare `tensorboard`, `python -m`
  or `torchrun` is fine only after `source .venv/bin/activate` in the same block; `python` alone is allowed
  everywhere (on a cluster it is the user's own environment). `source .venv/bin/activate`: the file must exist.
- Anything else must be marked, and is skipped.

How commands are rewritten (mechanically) before they run
---------------------------------------------------------
1. `[...]` arguments are optional and are dropped.
2. `VAR=value` before the command goes into the environment of that command.
3. Placeholders in PLACEHOLDERS (`<run>`, `/path/to/folder`, ...) become the workspace's stand-ins.
4. Everything runs in one workspace folder (a session temporary directory) as the current directory, so
   relative outputs (`runs/...`, `data/...`, `pool.pt`) land there. Script paths (`launch/submit.py`,
   `benchmarks/*.py`) are taken from the repository. Any other absolute path in an argument, outside the
   workspace, is moved under `<workspace>/abs/`.
5. Data: for Fashion-MNIST datasets (the default) the overrides of `fake_fmnist()` are appended. They point at a
   fake Fashion-MNIST built by the fixture (tests/fakes.py write_fake_fashion_mnist: 30 to 3 training images per
   class at IF 10, 8 train shards of 16 images). A dry run gets them too, except the keys the command sets itself.
   `dataset=imagefolder` gets a fake image folder (5 classes with train/ and test/). Any other dataset must be
   marked `data`, except in a dry run.
6. Tiny settings: distillation-like entry points (distill, pretrain, extract_features, submit local/debug,
   torchrun) get TINY appended: tests/runs.py TINY plus a 3-step budget, one evaluation epoch and a one-network
   pool (TINY_EXTRA); its `ipc=2` only when the command sets no `ipc`. `eval.at_steps=[...]` becomes `[1,2]`.
   `csdm_dist.evaluate` gets TINY_EVAL. `device=cuda` must be marked `gpu`.
7. Identical commands run once. Builds run first, then the commands that make runs, then those that
   read them (evaluate, export, tensorboard), each group in document order (README.md, then docs/ by name).

The commands of the files in IN_PROGRESS (a feature being written) are classified and skipped, with the reason,
until their feature lands.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import runpy
import shlex
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
VENV_BIN = Path(sys.executable).parent

NEEDS = {"slurm", "gpu", "nodes", "data", "network", "root", "long"}
SHELL_INFO = {"bash", "sh", "shell", "console"}
MODULES = {"data_prep.build", "data_prep.extract_features", "csdm_dist.distill", "csdm_dist.evaluate",
           "csdm_dist.pretrain", "csdm_dist.export", "csdm_dist.teacher"}
# Files whose commands are classified but not run yet: the feature they describe is being written. Remove an entry
# once its feature has landed (and give TINY what its entry point needs to be quick, e.g. teacher.epochs=1).
IN_PROGRESS: dict[str, str] = {}
FMNIST_DATASETS = {"fashion_mnist_lt", "fashion_mnist_lt_hardtail"}
SLURM_CLUSTERS = {"slurm", "imagenet_lt"}
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv/bin/python3"}
RUN = "runs/fmnist-csdm"  # the run directory the docs use as their example
PLACEHOLDERS = {"<run>": RUN, "<run dir>": RUN}  # plus /path/to/folder: the fake image folder (see `rewrite_args`)

TINY_EXTRA = ["distill.iterations=3", "eval.epochs=1", "extractor.pool_size=1", "extractor.pool_epochs=1",
              "teacher.epochs=1", "teacher.width=16", "teacher.depth=2"]
TINY_EVAL = ["eval.epochs=1", "eval.repeats=1", "eval.test_batch_size=256", "device=cpu"]
TINY_FLAGS = {"speed.py": ["--device", "cpu", "--steps", "1", "--warmup", "0", "--wait-idle", "0", "--retries", "0",
                           "--override", "extractor.width=16", "--override", "distill.real_per_class=8",
                           "--override", "method.kernel.num_freqs=32", "--precision", "fp32"]}  # in this process
IMAGEFOLDER_COUNTS = (12, 8, 5, 3, 2)  # train images per class of the fake image folder (natural counts)


# ---- reading the docs -------------------------------------------------------------------------------------------
@dataclass
class Command:
    file: str  # relative to the repository
    line: int  # 1-based line of the command's first line
    text: str  # the command, continuations joined, without its `# needs:` comment
    needs: tuple[str, ...] = ()
    activated: bool = False  # a `source .venv/bin/activate` came earlier in the same block
    words: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


_NEEDS_RE = re.compile(r"\s+#\s*needs:\s*(?P<what>[\w ,-]+?)\s*$")


def _command(file: str, line: int, text: str, activated: bool) -> Command:
    needs: tuple[str, ...] = ()
    m = _NEEDS_RE.search(text)
    if m:
        needs = tuple(w for w in re.split(r"[ ,]+", m.group("what")) if w)
        text = text[:m.start()]
    else:
        text = re.sub(r"\s+#.*$", "", text) if " #" in text else text  # a plain trailing comment
    text = text.strip()
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    return Command(file, line, text, needs, activated, words)


def read_commands(path: Path) -> list[Command]:
    """The commands of the fenced shell blocks of one Markdown file."""
    rel = str(path.relative_to(REPO))
    out: list[Command] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        marker, info = fence.group(1), fence.group(2).lower()
        i += 1
        activated, pending, start = False, "", 0
        while i < len(lines) and not lines[i].strip().startswith(marker):
            raw = lines[i].strip()
            i += 1
            if info not in SHELL_INFO:
                continue
            if not pending:
                if info == "console":
                    if not raw.startswith("$ "):
                        continue
                    raw = raw[2:]
                if not raw or raw.startswith("#"):
                    continue
                start = i
            if raw.endswith("\\"):
                pending += raw[:-1] + " "
                continue
            cmd = _command(rel, start, pending + raw, activated)
            pending = ""
            out.append(cmd)
            if cmd.words[:2] in (["source", ".venv/bin/activate"], [".", ".venv/bin/activate"]):
                activated = True
        i += 1
    return out


ALL = [c for p in DOCS for c in read_commands(p)]


# ---- classification ---------------------------------------------------------------------------------------------
def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        k, v = words[0].split("=", 1)
        env[k] = v
        words = words[1:]
    return env, words


def overrides_of(args: list[str]) -> dict[str, str]:
    return {a.split("=", 1)[0].lstrip("+~"): a.split("=", 1)[1] for a in args if "=" in a and not a.startswith("-")}


@dataclass
class Plan:
    kind: str  # module, submit, torchrun, make, speed, bench-parse, tensorboard, activate
    phase: int  # 0 build, 1 makes runs, 2 reads them
    target: str  # the module, or the script path
    args: list[str]
    env: dict[str, str]
    dataset: str | None = None
    dry_run: bool = False


def classify(cmd: Command) -> tuple[Plan | None, str | None]:
    """(plan, None): the test runs or checks the command as the plan says. (None, reason): a marked command that
    the test skips. (None, None): no rule covers it (`problem` says so)."""
    env, words = split_env(list(cmd.words))
    if not words:
        return None, None
    head = words[0]
    name = head.split("/")[-1]
    needs = set(cmd.needs)
    if head in ("source", ".") and words[1:] == [".venv/bin/activate"]:
        return Plan("activate", 2, words[1], [], env), None
    if name == "make" and head == "make":
        return Plan("make", 1, words[1] if len(words) > 1 else "", words[2:], env), None
    if name == "tensorboard" and (head == ".venv/bin/tensorboard" or cmd.activated):
        return Plan("tensorboard", 2, head, words[1:], env), None
    if name == "torchrun" and (head == ".venv/bin/torchrun" or cmd.activated):
        if needs:
            return None, f"needs {' '.join(cmd.needs)}"
        opts = [w for w in words[1:] if w.startswith("--")]
        mod = words[words.index("-m") + 1] if "-m" in words else None
        if mod not in MODULES:
            return None, None
        rest = words[words.index("-m") + 2:]
        return Plan("torchrun", 1, mod, opts + ["-m", mod] + rest, env, dataset_of(mod, rest)), None
    if head in PYTHONS:
        if len(words) > 2 and words[1] == "-m" and words[2] in MODULES:
            mod, args = words[2], words[3:]
            if needs:
                return None, f"needs {' '.join(cmd.needs)}"
            return Plan("module", _phase(mod), mod, args, env, dataset_of(mod, args)), None
        if len(words) > 1 and words[1] == "launch/submit.py":
            args = words[2:]
            cluster = overrides_of(args).get("cluster", "local")
            if cluster in SLURM_CLUSTERS and "root" not in needs:
                return Plan("submit", 1, words[1], args, env, dataset_of("submit", args), dry_run=True), None
            if needs:
                return None, f"needs {' '.join(cmd.needs)}"
            dry = overrides_of(args).get("cluster.dry_run", "false").lower() == "true"
            return Plan("submit", 1, words[1], args, env, dataset_of("submit", args), dry_run=dry), None
        if len(words) > 1 and re.fullmatch(r"benchmarks/\w+\.py", words[1]):
            script = words[1].split("/")[-1]
            if script in TINY_FLAGS and "gpu" not in needs and not (needs - {"long"}):
                return Plan("speed", 1, words[1], words[2:], env), None
            if needs & {"long", "gpu"}:
                return Plan("bench-parse", 1, words[1], words[2:], env), None
            return None, None
    if needs:
        return None, f"needs {' '.join(cmd.needs)}"
    return None, None


def _phase(module: str) -> int:
    return {"data_prep.build": 0, "csdm_dist.evaluate": 2, "csdm_dist.export": 2}.get(module, 1)


def dataset_of(module: str, args: list[str]) -> str | None:
    if module in ("csdm_dist.evaluate", "csdm_dist.export"):
        return None
    over = overrides_of(args)
    if over.get("cluster") == "imagenet_lt":
        return "imagenet_lt"
    return over.get("dataset", "fashion_mnist_lt")


def problem(cmd: Command) -> str | None:
    """Why `cmd` breaks the convention, or None."""
    bad = [w for w in cmd.needs if w not in NEEDS]
    if bad:
        return f"unknown need(s) {bad}; use words from {sorted(NEEDS)}"
    plan, skipped = classify(cmd)
    if plan is None and skipped is None:
        words = split_env(list(cmd.words))[1]
        head = words[0] if words else ""
        if head.split("/")[-1] in ("tensorboard", "torchrun") and not head.startswith(".venv/"):
            return (f"a bare `{head}` is not on PATH unless the venv is active: write .venv/bin/{head}, or "
                    f"`source .venv/bin/activate` earlier in the block")
        if len(words) > 1 and words[1].startswith("benchmarks/"):
            return "a benchmark other than speed.py: mark it `# needs: long` (or `gpu`); its flags are then parsed"
        return "neither run by this test nor marked `# needs: ...`"
    if plan is None:
        return None
    over = overrides_of(plan.args)
    if plan.kind in ("module", "torchrun") or (plan.kind == "submit" and not plan.dry_run):
        if over.get("device") == "cuda":
            return "uses device=cuda: mark it `# needs: gpu`"
        if plan.dataset not in FMNIST_DATASETS | {"imagefolder", None}:
            return f"uses dataset={plan.dataset}, whose raw files are not here: mark it `# needs: data`"
    if plan.kind == "torchrun":
        nodes = [w for w in plan.args if w.startswith("--nnodes")]
        if nodes and nodes[0].split("=")[-1] not in ("1", "1:1"):
            return "starts several nodes: mark it `# needs: nodes`"
    return None


def test_every_command_is_classified():
    assert ALL, "no commands found in README.md and docs/*.md"
    bad = [f"{c.where}: {c.text}\n    -> {why}" for c in ALL if (why := problem(c))]
    assert not bad, ("commands of the docs that this test neither runs nor finds marked (see the top of "
                     "tests/docs/test_docs.py):\n" + "\n".join(bad))


# ---- the workspace ----------------------------------------------------------------------------------------------
def write_fake_imagefolder(root: Path, counts=IMAGEFOLDER_COUNTS, test_per_class=4) -> Path:
    """root/train/<class>/*.png and root/test/<class>/*.png, RGB, 40x36, class-dependent brightness."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", counts), ("test", [test_per_class] * len(counts))):
        for c, n in enumerate(per_class):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                img = np.clip(rng.normal(40 + 40 * c, 20, size=(36, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{k}.png")
    return root


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """The folder every command runs in, with a fake Fashion-MNIST (built) and a fake image folder."""
    from csdm_dist.config import to_config
    from data_prep.build import build_dataset
    from fakes import write_fake_fashion_mnist
    from runs import compose_cfg

    ws = tmp_path_factory.mktemp("docs")
    write_fake_fashion_mnist(ws / "fake" / "fmnist", n_per_class=30, num_classes=10, seed=0)
    write_fake_imagefolder(ws / "fake" / "imagefolder")
    data = fake_fmnist(ws)
    build_dataset(to_config(compose_cfg(data)).dataset)
    return ws


def fake_fmnist(ws: Path) -> list[str]:
    return [f"dataset.raw_root={ws / 'fake' / 'fmnist'}", f"dataset.data_root={ws / 'data'}",
            "dataset.n_max=null", "dataset.val_per_class=0", "dataset.imbalance_factor=10",
            "dataset.samples_per_shard=16"]


def tiny() -> list[str]:
    from runs import TINY

    return [*TINY, *TINY_EXTRA]


# ---- rewriting --------------------------------------------------------------------------------------------------
def _relocate(value: str, ws: Path) -> str:
    if value.startswith("/") and not value.startswith(str(ws)) and not value.startswith(str(REPO)):
        return str(ws / "abs" / value.lstrip("/"))
    return value


def rewrite_args(plan: Plan, ws: Path) -> list[str]:
    """The command's arguments as this test runs them (the numbered rules at the top of this file)."""
    out = []
    for a in plan.args:
        if a.startswith("[") and a.endswith("]"):
            continue  # rule 1
        for k, v in PLACEHOLDERS.items():
            a = a.replace(k, v)
        a = a.replace("/path/to/folder", str(ws / "fake" / "imagefolder"))
        if "=" in a and not a.startswith("-"):
            key, value = a.split("=", 1)
            if key.lstrip("+~") == "eval.at_steps":
                value = "[1,2]"
            a = f"{key}={_relocate(value, ws)}"
        else:
            a = _relocate(a, ws)
        out.append(a)
    if plan.kind == "speed":
        return out + TINY_FLAGS[Path(plan.target).name]
    if plan.kind in ("bench-parse", "make", "tensorboard", "activate"):
        return out
    if plan.kind == "module" and plan.target in ("csdm_dist.evaluate",):
        return out + TINY_EVAL
    if plan.kind == "module" and plan.target == "csdm_dist.export":
        return out
    if plan.kind == "submit" and plan.dry_run:  # the fake data, except what the command sets itself
        data = [d for d in fake_fmnist(ws) if d.split("=")[0] not in overrides_of(out)] \
            if plan.dataset in FMNIST_DATASETS else []
        return out + data + ([] if "cluster.dry_run=true" in out else ["cluster.dry_run=true"])
    data = fake_fmnist(ws) if plan.dataset in FMNIST_DATASETS else []
    if plan.kind == "module" and plan.target == "data_prep.build":
        return out + data
    extra = [t for t in tiny() if not (t.startswith("ipc=") and "ipc" in overrides_of(out))]
    return out + data + extra


# ---- running ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def patched(argv: list[str], env: dict[str, str], cwd: Path, path: Path | None = None):
    saved = sys.argv, dict(os.environ), os.getcwd(), list(sys.path)
    sys.argv = argv
    os.environ.update(env)
    os.chdir(cwd)
    if path is not None:
        sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.argv = saved[0]
        os.environ.clear()
        os.environ.update(saved[1])
        os.chdir(saved[2])
        sys.path[:] = saved[3]


def run_in_process(module: str | None, script: Path | None, args: list[str], env: dict[str, str], ws: Path) -> int:
    """Run `python -m module args` (or `python script args`) in this process; its exit status."""
    from hydra.core.global_hydra import GlobalHydra

    from csdm_dist.dist import close_distributed

    GlobalHydra.instance().clear()
    argv0 = module or str(script)
    code: object = 0
    with patched([argv0, *args], env, ws, script.parent if script else None), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is imported already
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(script), run_name="__main__")
        except SystemExit as e:
            code = e.code
        finally:
            close_distributed()
            GlobalHydra.instance().clear()
    return 0 if code is None else code if isinstance(code, int) else 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_subprocess(argv: list[str], env: dict[str, str], ws: Path, timeout: int = 240) -> int:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    clean.update(OMP_NUM_THREADS="1", **env)
    proc = subprocess.run(argv, cwd=ws, env=clean, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + "\n" + proc.stderr[-8000:])
    return proc.returncode


def parse_flags(script: Path, args: list[str]) -> None:
    """The script's own parser accepts these flags (argparse exits with 2 otherwise)."""
    sys.path.insert(0, str(script.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"_docs_{script.stem}", script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.parse_args(args)
    finally:
        sys.path.remove(str(script.parent))


def execute(plan: Plan, ws: Path) -> str | None:
    """Run or check one planned command; None on success, else what went wrong."""
    args = rewrite_args(plan, ws)
    if plan.kind == "module":
        code = run_in_process(plan.target, None, args, plan.env, ws)
    elif plan.kind in ("submit", "speed"):
        code = run_in_process(None, REPO / plan.target, args, plan.env, ws)
    elif plan.kind == "torchrun":
        opts = [f"--nproc_per_node={min(2, int(a.split('=')[1]))}" if a.startswith("--nproc_per_node=") else a
                for a in args[:args.index("-m")]]
        if not any(a.startswith("--master_port") for a in opts):
            opts += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
        code = run_subprocess([str(VENV_BIN / "torchrun"), *opts, *args[args.index("-m"):]], plan.env, ws)
    elif plan.kind == "make":
        code = run_subprocess(["make", "-n", "-C", str(REPO), plan.target, *args], plan.env, ws, timeout=60)
    elif plan.kind == "bench-parse":
        parse_flags(REPO / plan.target, args)
        code = 0
    elif plan.kind == "tensorboard":
        exe = VENV_BIN / "tensorboard"
        return None if exe.is_file() and os.access(exe, os.X_OK) else f"{exe} is missing"
    elif plan.kind == "activate":
        return None if (VENV_BIN / "activate").is_file() else f"{VENV_BIN / 'activate'} is missing"
    else:
        return f"no runner for {plan.kind}"
    return None if code == 0 else f"exit {code}: {plan.kind} {plan.target} {' '.join(args)}"


def _runnable() -> list[tuple[Command, Plan]]:
    seen, out = set(), []
    for c in ALL:
        if problem(c):
            continue
        plan, _ = classify(c)
        if plan is None:
            continue
        key = (plan.kind, plan.target, tuple(plan.args), tuple(sorted(plan.env.items())))
        if key in seen:
            continue
        seen.add(key)
        out.append((c, plan))
    order = {id(p): i for i, (_, p) in enumerate(out)}
    return sorted(out, key=lambda cp: (cp[1].phase, order[id(cp[1])]))


RUNNABLE = _runnable()


@pytest.mark.parametrize("cmd,plan", RUNNABLE, ids=[f"{c.where}" for c, _ in RUNNABLE])
def test_command_runs(cmd: Command, plan: Plan, workspace: Path):
    why = IN_PROGRESS.get(cmd.file)
    if why:
        pytest.skip(why)
    err = execute(plan, workspace)
    assert err is None, f"{cmd.where}: `{cmd.text}` failed: {err}"
