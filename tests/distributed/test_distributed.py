"""Multi-process tests of the distributed design (DESIGN.md sections 3-4), on the CPU with gloo.

Every run is a real launch of the entry point in a child process: `python -m csdm_dist.distill` (a world of one)
or `torchrun ... -m csdm_dist.distill` (N ranks, one node or two "nodes" on localhost), on a tiny fake
Fashion-MNIST-LT (118 train images, IF 10) built once per module into several WebDataset shards. What is checked:

- 1 rank and 2 ranks (one node, and two torchrun launches as two nodes) take the same steps: same distilled images
  and same per-step losses up to fp32 summation order, also when the shard count is not a multiple of the ranks,
  with multi-formation (synthetic.factor=2, distill.init=mix: each rank decodes its own stored images), and with
  the teacher's cross-entropy term of a soft-label set (labels.teacher_ce, each rank's own decoded images);
- evaluation spread over 2 ranks (one network each) gathers what 1 rank training both networks reports;
- every real training sample is held by exactly one rank (2 ranks; 3 ranks on 2 shards, where one rank holds
  none), and a distillation with an empty rank runs to the end with every rank taking every step;
- a 2-rank run stopped and resumed from its checkpoint ends exactly where an uninterrupted one does; each rank
  writes its own DeepSpeed file; a resume with another world size is refused;
- a 2-rank run whose rank 1 is SIGKILLed mid-run fails, and the relaunched command resumes from the newest
  complete checkpoint and ends exactly where an uninterrupted run does.

Each launch has a timeout (a hang fails the test), its own free port, OMP_NUM_THREADS=1, and its console output in
a log file under the test's tmp_path whose tail goes into assertion messages.

Run: .venv/bin/python -m pytest tests/distributed -q     (about 2-3 minutes on 2 CPU cores)
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from hydra import compose, initialize_config_dir

from csdm_dist.config import register_configs, to_config
from csdm_dist.extractors import bf16_support
from data_prep.build import build_dataset
from fakes import write_fake_fashion_mnist

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
LAUNCH_TIMEOUT = 150  # seconds per launch; a healthy one takes 4-20 s here
LR = 0.01  # pinned: the image tolerance below scales with it
TINY = ["ipc=3", "extractor.width=16", "extractor.depth=2", "method.kernel.num_freqs=64", f"distill.lr={LR}",
        "distill.real_per_class=8", "distill.log_every=1", "distill.image_every=0", "evaluate=false", "device=cpu",
        "precision=fp32"]  # the agreement below is fp32's summation order; bf16 has its own test and tolerance
K = 6  # steps of the agreement runs

# 1 rank vs N ranks: the same arithmetic except the order in which fp32 sums are added (the all-reduce of the
# class statistics adds per-rank partial sums; one rank adds them in one pass). Those ~1e-7 relative differences
# reach the pixels through Adam, whose update lr * m / (sqrt(v) + eps) is close to +-lr for any gradient, so a
# tiny gradient of slightly different value can move its pixel by a visible fraction of lr = 0.01. Observed:
# max |diff| ~5e-5 (0.005 lr) after 6 steps on pixels of normalised scale ~1 that move by ~6e-2; 0.01 lr stays far
# below that.
ATOL_IMAGES = 0.01 * LR
RTOL_LOSS = 1e-4  # per-step losses: the same summation-order noise, before any optimizer amplification
# bf16 (precision=bf16): oneDNN rounds each image's convolutions to ~3 significant digits in a way that depends on
# the batch and the thread count (1 rank: 2 threads on all images; 2 ranks: 1 thread each on half), so per-image
# features differ by ~1e-3 relative: losses by about that, and near-zero pixel gradients flip sign under Adam
# (each flip moves a pixel by up to 2 lr over the K steps). Observed: 0.5 lr, losses 1e-4 relative.
ATOL_IMAGES_BF16, RTOL_LOSS_BF16 = 2 * LR, 2e-3
# The same world size (resume, kill and relaunch) repeats the very same arithmetic: bit-equal images.


# ---- launching --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def tail(path: Path, n: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.is_file() else "(no output)"
    return f"\n---- last {n} chars of {path} ----\n{text[-n:]}"


def default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A suite started as a background job of a shell
    without job control inherits SIGINT ignored, and Python then leaves it ignored (no KeyboardInterrupt), so the
    tests that send SIGINT would wait for a run that never stops."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Launch:
    """A child process (group) whose stdout and stderr go to `log`."""
    live: list["Launch"] = []  # killed at the end of each test if still running (a failed assertion left them)

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None):
        self.cmd, self.log = cmd, log
        self._out = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**child_env(), **(env or {})}, stdout=self._out,
                                     stderr=subprocess.STDOUT, preexec_fn=default_sigint,
                                     start_new_session=True)  # own process group: a hang is killed whole
        Launch.live.append(self)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._out.close()

    def wait(self, timeout: float = LAUNCH_TIMEOUT) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"timed out after {timeout} s (hang?): {' '.join(self.cmd)}{tail(self.log)}")
        self._out.close()
        return rc

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    yield
    while Launch.live:
        Launch.live.pop().kill()


def distill_cmd(overrides: list[str], nproc: int = 0, nnodes: int = 1, node_rank: int = 0,
                port: int | None = None) -> list[str]:
    """nproc 0: plain `python -m csdm_dist.distill`; else torchrun with nproc ranks per node."""
    if nproc == 0:
        return [PYTHON, "-m", "csdm_dist.distill", *overrides]
    return [TORCHRUN, f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", f"--node_rank={node_rank}",
            "--master_addr=127.0.0.1", f"--master_port={port or free_port()}", "-m", "csdm_dist.distill", *overrides]


def run_ok(cmd: list[str], log: Path) -> str:
    launch = Launch(cmd, log)
    rc = launch.wait()
    assert rc == 0, f"exit status {rc}: {' '.join(cmd)}{tail(log)}"
    return launch.output()


def distil(overrides: list[str], out: Path, nproc: int = 0) -> Path:
    run_ok(distill_cmd(overrides + [f"out_dir={out}"], nproc), out.with_name(out.name + ".console.log"))
    return out


def images(out: Path) -> torch.Tensor:
    return torch.load(out / "distilled.pt", weights_only=False)["images"]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def losses(out: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("distill/loss")}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_agree(ref: Path, other: Path, what: str, atol: float = ATOL_IMAGES, rtol: float = RTOL_LOSS) -> None:
    """`other` (N ranks) took the same K steps as `ref` (1 rank): images and every logged loss within tolerance."""
    assert results(other)["timing"]["steps"] == results(ref)["timing"]["steps"] == K
    d = max_diff(images(ref), images(other))
    print(f"{what}: max |image diff| vs 1 rank = {d:.3g}")
    assert d <= atol, f"{what}: images differ from the 1-rank run by {d:.3g} > {atol}"
    l1, ln = losses(ref), losses(other)
    assert sorted(l1) == sorted(ln) == list(range(1, K + 1)), (l1, ln)
    worst = max(abs(l1[s] - ln[s]) / max(abs(l1[s]), 1e-6) for s in l1)
    print(f"{what}: max relative loss diff = {worst:.3g}")
    for s in l1:
        assert ln[s] == pytest.approx(l1[s], rel=rtol, abs=1e-7), f"{what}: loss at step {s}: {l1} vs {ln}"


def complete_checkpoints(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.parent.name.split("-")[1]) for p in root.glob("step-*/meta.json")) if root.is_dir() else []


# ---- data -------------------------------------------------------------------------------------------------------
def compose_cfg(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="config", overrides=overrides)


# name -> samples per shard; 118 train images: 16 -> 8 shards, 17 -> 7 (odd), 60 -> 2 (fewer than 3 ranks)
SHARDINGS = {"even": (16, 8), "odd": (17, 7), "two": (60, 2)}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, list[str]]:
    """name -> the dataset overrides of a built fake Fashion-MNIST-LT with that many train shards."""
    root = tmp_path_factory.mktemp("fmnist")
    write_fake_fashion_mnist(root / "raw", n_per_class=30, num_classes=10, seed=0)
    out = {}
    for name, (per_shard, want) in SHARDINGS.items():
        over = [f"dataset.raw_root={root / 'raw'}", f"dataset.data_root={root / name}", "dataset.imbalance_factor=10",
                f"dataset.samples_per_shard={per_shard}", "dataset.n_max=null", "dataset.val_per_class=0"]
        ddir = build_dataset(to_config(compose_cfg(over)).dataset)
        manifest = json.loads((ddir / "manifest.json").read_text())
        assert manifest["train"]["num_samples"] == 118 and len(manifest["train"]["shards"]) == want, manifest["train"]
        out[name] = over
    return out


@pytest.fixture(scope="module")
def one_rank(datasets, tmp_path_factory):
    """(dataset name, iterations) -> out_dir of a plain 1-process run, each made once per module."""
    root, done = tmp_path_factory.mktemp("one_rank"), {}

    def get(name: str, iterations: int = K) -> Path:
        if (name, iterations) not in done:
            done[name, iterations] = distil(datasets[name] + TINY + [f"distill.iterations={iterations}"],
                                            root / f"{name}-{iterations}")
        return done[name, iterations]

    return get


# ---- 1 rank vs N ranks ------------------------------------------------------------------------------------------
def test_one_and_two_ranks_agree(datasets, one_rank, tmp_path):
    ref, start = one_rank("even", K), one_rank("even", 0)
    two = distil(datasets["even"] + TINY + [f"distill.iterations={K}"], tmp_path / "two", nproc=2)
    assert results(two)["world_size"] == 2
    moved = max_diff(images(start), images(ref))
    assert moved > 100 * ATOL_IMAGES, f"the images hardly moved in {K} steps ({moved:.3g}): the test would be trivial"
    assert_agree(ref, two, "2 ranks, 1 node")


@pytest.mark.skipif(not bf16_support(torch.device("cpu"))[0], reason="this CPU has no native bf16")
def test_one_and_two_ranks_agree_in_bf16(datasets, tmp_path):
    """precision=bf16 (the default `auto` on this CPU): the same steps up to bf16's rounding (see RTOL_LOSS_BF16)."""
    over = datasets["even"] + TINY + [f"distill.iterations={K}", "precision=bf16"]
    ref, two = distil(over, tmp_path / "one"), distil(over, tmp_path / "two", nproc=2)
    assert results(ref)["precision"] == results(two)["precision"] == "bf16"
    assert_agree(ref, two, "2 ranks, 1 node, bf16", ATOL_IMAGES_BF16, RTOL_LOSS_BF16)


@pytest.mark.parametrize("name", ["even", "odd"])
def test_two_nodes_on_localhost_agree(datasets, one_rank, tmp_path, name):
    out, port = tmp_path / "two_nodes", free_port()
    over = datasets[name] + TINY + [f"distill.iterations={K}", f"out_dir={out}"]
    nodes = [Launch(distill_cmd(over, nproc=1, nnodes=2, node_rank=r, port=port), tmp_path / f"node{r}.log")
             for r in (0, 1)]
    codes = [node.wait() for node in nodes]
    assert codes == [0, 0], f"exit statuses {codes}{tail(nodes[0].log)}{tail(nodes[1].log)}"
    assert results(out)["world_size"] == 2
    for r in (0, 1):  # each node ran one rank, holding part of the real data
        assert re.search(rf"rank {r} holds \d+ of 118 real images", (out / f"distill-rank{r}.log").read_text())
    assert_agree(one_rank(name, K), out, f"2 nodes x 1 rank, {name} shard count")



def test_one_and_two_ranks_agree_with_multi_formation(datasets, tmp_path):
    """synthetic.factor=2, distill.init=mix: each rank decodes the stored images it owns (DESIGN.md section 3), so
    2 ranks take the 1-rank steps, from the same mixed start; distilled.pt keeps the stored images."""
    over = datasets["even"] + TINY + ["synthetic.factor=2", "distill.init=mix"]
    start = distil(over + ["distill.iterations=0"], tmp_path / "start")
    ref = distil(over + [f"distill.iterations={K}"], tmp_path / "one")
    two = distil(over + [f"distill.iterations={K}"], tmp_path / "two", nproc=2)
    blob = torch.load(two / "distilled.pt", weights_only=False)
    assert blob["factor"] == 2 and blob["images"].shape == (30, 1, 28, 28)  # ipc=3 stored images per class
    moved = max_diff(images(start), images(ref))
    assert moved > 100 * ATOL_IMAGES, f"the images hardly moved in {K} steps ({moved:.3g}): the test would be trivial"
    assert_agree(ref, two, "2 ranks, 1 node, synthetic.factor=2 init=mix")

def test_one_and_two_ranks_agree_with_the_teacher_cross_entropy_term(datasets, tmp_path):
    """labels.teacher_ce: each rank adds the teacher's cross-entropy of its own decoded images, divided by the global
    count, with the straight-through sum of the statistics; 2 ranks take the 1-rank steps, and the term moves them."""
    teacher = tmp_path / "teacher.pt"
    run_ok([PYTHON, "-m", "csdm_dist.teacher", *datasets["even"], "teacher.width=16", "teacher.depth=2",
            "teacher.epochs=1", "teacher.batch_size=32", f"labels.teacher={teacher}", "device=cpu"],
           tmp_path / "teacher.console.log")
    over = datasets["even"] + TINY + ["synthetic.factor=2", "labels.kind=soft", f"labels.teacher={teacher}",
                                      "teacher.width=16", "teacher.depth=2", f"distill.iterations={K}"]
    ref = distil(over + ["labels.teacher_ce=1.0"], tmp_path / "one")
    two = distil(over + ["labels.teacher_ce=1.0"], tmp_path / "two", nproc=2)
    plain = distil(over, tmp_path / "plain")
    moved = max_diff(images(plain), images(ref))
    assert moved > 100 * ATOL_IMAGES, f"the teacher term hardly changed the images ({moved:.3g}): trivial test"
    assert_agree(ref, two, "2 ranks, 1 node, labels.teacher_ce=1 synthetic.factor=2")


# ---- real data: exactly once ------------------------------------------------------------------------------------
GATHER_IDS = textwrap.dedent("""
    # Under torchrun: each rank loads its real shards as the distillation does; rank 0 writes every rank's ids.
    import json, sys
    import torch, torch.distributed as dist
    from hydra import compose, initialize_config_dir
    from csdm_dist.config import register_configs, to_config
    from csdm_dist.dist import ParallelLayout, close_distributed, init_distributed
    from csdm_dist.distill import load_real

    configs, out, *overrides = sys.argv[1:]
    register_configs()
    with initialize_config_dir(config_dir=configs, version_base=None):
        cfg = to_config(compose(config_name="config", overrides=overrides))
    rt = init_distributed("cpu")
    layout = ParallelLayout.from_world(1, rt.rank, rt.world_size)
    from csdm_dist.data.shards import dataset_dir, load_manifest
    manifest = load_manifest(dataset_dir(cfg.dataset), cfg.dataset)
    real = load_real(cfg, layout, rt.device, manifest)
    n = torch.tensor([len(real.ids)])
    sizes = [torch.zeros_like(n) for _ in range(rt.world_size)]
    dist.all_gather(sizes, n)
    width = max(1, max(int(s) for s in sizes))
    mine = torch.full((2, width), -1, dtype=torch.long)  # ids, labels; padded with -1
    mine[0, :len(real.ids)], mine[1, :len(real.ids)] = real.ids, real.labels
    every = [torch.empty_like(mine) for _ in range(rt.world_size)]
    dist.all_gather(every, mine)
    if rt.rank == 0:
        per_rank = [{"ids": t[0, :int(s)].tolist(), "labels": t[1, :int(s)].tolist()} for t, s in zip(every, sizes)]
        with open(out, "w") as f:
            json.dump({"ranks": per_rank, "train": manifest["train"]}, f)
    close_distributed()
""")



def test_evaluation_spread_over_two_ranks_equals_one_rank(one_rank, tmp_path):
    """`python -m csdm_dist.evaluate` under torchrun: repeat r trains on rank r mod 2, and the gathered accuracies
    and confusions are those of one process training both networks (each repeat has its own seeded stream)."""
    import shutil

    acc = {}
    for nproc in (0, 2):
        run = tmp_path / f"eval-{nproc}"
        run.mkdir()
        shutil.copy(one_rank("even", K) / "distilled.pt", run)
        over = [f"distilled={run / 'distilled.pt'}", "eval.repeats=2", "eval.epochs=2", "device=cpu"]
        cmd = ([PYTHON, "-m", "csdm_dist.evaluate", *over] if nproc == 0 else
               [TORCHRUN, f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                "-m", "csdm_dist.evaluate", *over])
        run_ok(cmd, tmp_path / f"eval-{nproc}.console.log")
        (record,) = run.glob("eval-*.json")
        acc[nproc] = json.loads(record.read_text())["accuracy"]
    one, two = acc[0], acc[2]
    assert one["repeats"] == two["repeats"] == 2
    assert two["per_repeat"] == pytest.approx(one["per_repeat"], abs=1e-4)  # both networks, gathered from 2 ranks
    assert two["per_class"] == pytest.approx(one["per_class"], abs=1e-4)
    assert two["confused_with"] == one["confused_with"]  # the confusion counts, summed over the ranks
    assert sum(rate for wrong in one["confused_with"] for _, rate in wrong) > 0  # something was mistaken

@pytest.mark.parametrize("name,nproc", [("even", 2), ("odd", 2), ("two", 3)])
def test_real_data_exactly_once(datasets, tmp_path, name, nproc):
    script, out = tmp_path / "gather_ids.py", tmp_path / "ids.json"
    script.write_text(GATHER_IDS)
    cmd = [TORCHRUN, f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(script), str(CONFIGS), str(out), *datasets[name], "device=cpu"]
    run_ok(cmd, tmp_path / "gather.log")
    got = json.loads(out.read_text())
    train, ranks = got["train"], got["ranks"]
    assert len(ranks) == nproc
    ids = [i for r in ranks for i in r["ids"]]
    assert sorted(ids) == list(range(train["num_samples"])), "some sample is missing or held by two ranks"
    labels = torch.tensor([y for r in ranks for y in r["labels"]])
    assert torch.bincount(labels, minlength=10).tolist() == train["counts"]
    # rank r reads shards r, r + nproc, ...: its share is the sum of those shards' sizes
    assert [len(r["ids"]) for r in ranks] == [sum(train["shard_sizes"][r::nproc]) for r in range(nproc)]
    if name == "two":
        assert len(ranks[2]["ids"]) == 0  # 2 shards, 3 ranks: rank 2 holds no real data


def test_three_ranks_with_an_empty_one_distil(datasets, one_rank, tmp_path):
    """3 ranks on 2 shards: rank 2 has no real images, yet takes every step and the result is the 1-rank one."""
    three = distil(datasets["two"] + TINY + [f"distill.iterations={K}"], tmp_path / "three", nproc=3)
    assert "rank 2 holds 0 of 118 real images" in (three / "distill-rank2.log").read_text()
    final = three / "checkpoints" / f"step-{K:06d}"
    for r in range(3):  # every rank saved its slice after K optimizer steps
        state = torch.load(final / f"mp_rank_{r:02d}_model_states.pt", weights_only=False)
        assert state["step"] == state["global_steps"] == K, (r, state["step"], state["global_steps"])
        assert state["ids"] == list(range(r, 30, 3))
    assert_agree(one_rank("two", K), three, "3 ranks, one without real data")


# ---- checkpoints ------------------------------------------------------------------------------------------------
def test_checkpoint_resume_on_two_ranks(datasets, tmp_path):
    common = datasets["even"] + TINY + ["distill.checkpoint_every=2"]
    full = distil(common + ["distill.iterations=8"], tmp_path / "full", nproc=2)
    cut = distil(common + ["distill.iterations=4"], tmp_path / "cut", nproc=2)
    at_4 = images(cut)
    assert complete_checkpoints(cut) == [2, 4]
    log = tmp_path / "resume.log"
    text = run_ok(distill_cmd(common + ["distill.iterations=8", f"out_dir={cut}"], nproc=2), log)
    resumed = re.findall(r"\[rank (\d)\].*resumed from \S+step-000004 at step (\d+)", text)
    assert sorted(resumed) == [("0", "4"), ("1", "4")], f"both ranks should resume at step 4{tail(log)}"
    assert results(cut)["timing"]["steps"] == 8
    assert torch.equal(images(full), images(cut)), f"resumed != uninterrupted: {max_diff(images(full), images(cut))}"
    assert not torch.equal(at_4, images(full))  # the resumed steps did move the images

    for out in (full, cut):
        assert complete_checkpoints(out) == [6, 8]  # keep_checkpoints=2
        folder = out / "checkpoints" / "step-000008"
        files = sorted(p.name for p in folder.iterdir())
        print(f"{folder}: {files}")
        assert files == ["meta.json", "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"], files
        assert json.loads((folder / "meta.json").read_text())["world_size"] == 2
        for r in (0, 1):  # each shard rank wrote its own slice and optimizer state
            state = torch.load(folder / f"mp_rank_{r:02d}_model_states.pt", weights_only=False)
            assert state["ids"] == list(range(r, 30, 2)) and state["step"] == state["global_steps"] == 8
            assert state["module"]["images"].shape == (15, 1, 28, 28)

    # the same out_dir as a world of one: the layout changed, so resuming must be refused, naming world_size
    bad = Launch(distill_cmd(common + ["distill.iterations=10", f"out_dir={cut}"]), tmp_path / "one.log")
    assert bad.wait() != 0 and "world_size" in bad.output(), tail(bad.log)


def find_worker(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    for p in launcher.children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank) and "csdm_dist.distill" in " ".join(p.cmdline()):
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return None


def test_sigkilled_rank_recovers(datasets, tmp_path):
    iterations, every = 60, 3
    common = datasets["even"] + TINY + [f"distill.iterations={iterations}", f"distill.checkpoint_every={every}"]
    out = tmp_path / "killed"
    cmd = distill_cmd(common + [f"out_dir={out}"], nproc=2)
    first = Launch(cmd, tmp_path / "killed.log")
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not [s for s in complete_checkpoints(out) if s >= 2 * every]:
        assert first.proc.poll() is None, f"the run ended before its step-{2 * every} checkpoint{tail(first.log)}"
        assert time.monotonic() < deadline, f"no step-{2 * every} checkpoint in time{tail(first.log)}"
        time.sleep(0.005)
    victim = find_worker(psutil.Process(first.proc.pid), rank=1)
    assert victim is not None, f"no rank-1 worker under torchrun {first.proc.pid}{tail(first.log)}"
    seen = max(complete_checkpoints(out))  # the newest complete checkpoint before the kill
    victim.send_signal(signal.SIGKILL)
    rc = first.wait()
    assert rc != 0, f"torchrun succeeded although rank 1 was killed (did the run end first?){tail(first.log)}"
    assert "Signal 9 (SIGKILL) received" in first.output(), tail(first.log)
    assert not (out / "distilled.pt").exists(), "the killed run must not have finished"
    on_disk = max(complete_checkpoints(out))
    print(f"killed rank 1 after checkpoint step {seen}; newest complete checkpoint after the kill: {on_disk}")

    text = run_ok(cmd, tmp_path / "relaunch.log")
    resumed = re.findall(r"\[rank (\d)\].*resumed from \S+ at step (\d+)", text)
    assert sorted(r for r, _ in resumed) == ["0", "1"], \
        f"both ranks should log a resume{tail(tmp_path / 'relaunch.log')}"
    steps = {int(s) for _, s in resumed}
    assert steps == {on_disk} and on_disk >= seen, (steps, seen, on_disk)  # lost at most `every` steps of work
    assert results(out)["timing"]["steps"] == iterations

    ref = distil(common, tmp_path / "uninterrupted", nproc=2)
    assert torch.equal(images(ref), images(out)), f"relaunched != uninterrupted: {max_diff(images(ref), images(out))}"
