"""The GPU bundle and benchmarks/gpu.sh, on this machine's CPU, so that the one real GPU call cannot fail on an
install, a missing dependency or a typo (docs/gpu.md).

Run: .venv/bin/python -m pytest tests/gpu -q     (about 2-3 minutes on 2 CPU cores; no network once the wheel
cache ~/.cache/csdm-gpu-wheels is filled, see below)

What it does
------------
1. Builds two bundles with the very script `make gpu-bundle` runs (benchmarks/gpu_bundle.py build), into tmp
   folders: the device's (Python 3.12) and a variant for this interpreter (`--python 3.11`). It checks the 3.12
   one: its manifest and python tag, every compiled wheel cp312 (or abi3) manylinux x86_64, deepspeed a
   py3-none-any wheel with no C++ op built, the whole under 48 MiB; and that the pure-Python wheels of the two
   bundles are the same files (sha256). The wheels come from the cache (--cache, default
   ~/.cache/csdm-gpu-wheels); only what is missing there is fetched from the package index (PyPI). With neither,
   the builder exits 3 and the test is skipped, saying so. Fashion-MNIST comes from /usr/share/datasets (Debian's
   dataset-fashion-mnist); without it the test is skipped.
2. Makes a stand-in for the device's python3: a fresh venv of this same CPython (no site-packages of its own),
   with PYTHONPATH set to a folder of links to .venv's copies of exactly what the device's image has (DEVICE_HAS
   in benchmarks/gpu_bundle.py: torch, torchvision, numpy, scipy, pillow, tensorboard, tqdm, with what they
   require, and pip). Nothing else of .venv is visible there: the test first checks that it cannot import
   deepspeed, hydra, webdataset, submitit, pydantic or yaml before the bundle is installed.
3. Runs `benchmarks/gpu.sh OUT --bundle <3.11 bundle> --device cpu --smoke` with that python3: gpu.sh installs the
   bundle with `pip install --no-index --no-deps --target OUT/site` itself, and runs every step (env, imports,
   build, a tiny distillation on the real Fashion-MNIST, 1 rank against 2 ranks under torchrun with gloo, the speed
   benchmark, two quality cells) at tiny settings. Every step must PASS and the last line must sum them up.
4. gpu.sh's refusals, each one line and exit 2: a bundle for another Python (the 3.12 one), no CUDA without
   --device cpu, no bundle.

What it cannot cover
--------------------
- CUDA: every step runs on the CPU here. The bf16 autocast, the nccl backend, the device's GPU memory and the
  CUDA speed numbers are only exercised by the real GPU call.
- The device's Python 3.12 and torch 2.11: the stand-in runs this machine's CPython 3.11 and .venv's torch 2.14.1
  (torch 2.11 for Python 3.11 is a CUDA wheel of about 900 MB: not fetched). The cp312 wheels are checked by
  their tags only, not installed; the pure-Python wheels, identical in both bundles, are installed and run.
  docs/gpu.md says how the code was checked against torch 2.11's API.
- The device's own copies of DEVICE_HAS (their versions, and whatever else its image holds that could shadow the
  bundle): the stand-in has .venv's.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
BUILDER = REPO / "benchmarks" / "gpu_bundle.py"
GPU_SH = REPO / "benchmarks" / "gpu.sh"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
STEPS = ("env", "imports", "build", "distill", "ranks", "speed", "quality")
HERE = f"{sys.version_info[0]}.{sys.version_info[1]}"

sys.path.insert(0, str(BUILDER.parent))
import gpu_bundle  # noqa: E402


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, python: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BUILDER), "build", "--out", str(out), "--python", python, *extra],
                          capture_output=True, text=True, timeout=600)


# ---- the stand-in for the device's python3 ------------------------------------------------------------------------
def _closure(roots) -> list[md.Distribution]:
    """The installed distributions `roots` need (their requirements, markers evaluated here, no extras)."""
    seen: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        name = gpu_bundle.norm(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional or platform-specific requirement that is not installed
        seen[name] = dist
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return list(seen.values())


def device_site(dest: Path) -> list[str]:
    """dest/: links to .venv's top-level entries of DEVICE_HAS + pip and their requirements; their names."""
    dest.mkdir(parents=True)
    names = []
    for dist in _closure([*gpu_bundle.DEVICE_HAS, "pip"]):
        names.append(dist.metadata["Name"])
        site = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = site / top
            if src.exists() and not (dest / top).exists() and not top.endswith(".pth") and top != "__pycache__":
                (dest / top).symlink_to(src)
    return sorted(names)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """(3.12 bundle, 3.11 bundle) built by benchmarks/gpu_bundle.py from the wheel cache."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no Fashion-MNIST in {FMNIST}: apt-get install -y dataset-fashion-mnist (make fmnist)")
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for python in ("3.12", HERE):
        proc = build(root / python, python)
        if proc.returncode == 3:
            pytest.skip(f"the wheels are neither in the cache nor to be had from the package index: {proc.stderr}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out[python] = root / python
    return out["3.12"], out[HERE]


@pytest.fixture(scope="module")
def device_python(tmp_path_factory):
    """(python3, env): a fresh venv of this CPython whose PYTHONPATH holds the device's packages only."""
    root = tmp_path_factory.mktemp("device")
    base = Path(sys.base_prefix) / "bin" / f"python{HERE}"
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    names = device_site(root / "site")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(root / "site"), PYTHONNOUSERSITE="1",
               PATH=f"{root / 'venv' / 'bin'}:{env.get('PATH', '')}")
    return root / "venv" / "bin" / "python", env, names


# ---- the bundle -------------------------------------------------------------------------------------------------
def test_pins_match_the_project():
    """PURE and COMPILED pin what pyproject.toml pins and what .venv runs the test suite with."""
    text = (REPO / "pyproject.toml").read_text()
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', text))
    for name, version in {**gpu_bundle.PURE, **gpu_bundle.COMPILED}.items():
        if name in pins:
            assert pins[name] == version, f"{name}: pyproject.toml pins {pins[name]}, the bundle {version}"
        assert md.version(name) == version, f"{name}: .venv has {md.version(name)}, the bundle pins {version}"
    needed = {gpu_bundle.norm(d.metadata["Name"]) for d in _closure(["csdm-dist"])} - {"csdm-dist"}
    device = {gpu_bundle.norm(d.metadata["Name"]) for d in _closure(gpu_bundle.DEVICE_HAS)}
    bundled = {gpu_bundle.norm(n) for n in (*gpu_bundle.PURE, *gpu_bundle.COMPILED)}
    assert needed - device - bundled == set(), "the project needs these, and neither the device nor the bundle has them"


def test_bundle_contents(bundles):
    b312, b311 = bundles
    head, rows = gpu_bundle.read_manifest(b312)
    assert head["python"] == "3.12" and head["tag"] == "cp312"
    files = {p: (h, n) for h, n, p in rows}
    assert {f"fashion-mnist/{f}" for f in gpu_bundle.FMNIST_FILES} <= set(files)
    for p, (h, n) in files.items():
        assert sha(b312 / p) == h and (b312 / p).stat().st_size == n, p
    total = sum(n for _, n in files.values()) + (b312 / gpu_bundle.MANIFEST).stat().st_size
    assert total <= gpu_bundle.MAX_MIB * 2**20, f"{total / 2**20:.1f} MiB"
    wheels = sorted((b312 / "wheels").glob("*.whl"))
    names = {gpu_bundle.wheel_info(w)[0]: w for w in wheels}
    assert set(names) == {gpu_bundle.norm(n) for n in (*gpu_bundle.PURE, *gpu_bundle.COMPILED)}
    accept = gpu_bundle.supported_tags("3.12")
    for name, whl in names.items():
        _, version, tags = gpu_bundle.wheel_info(whl)
        assert tags & accept, f"{whl.name} does not install on CPython 3.12 manylinux x86_64"
        assert not any(t.interpreter.startswith("cp3") and t.interpreter != "cp312" and t.abi != "abi3" for t in tags)
        if name in {gpu_bundle.norm(n) for n in gpu_bundle.PURE}:
            assert gpu_bundle.is_pure_tag(tags), whl.name
    ds = names["deepspeed"]
    assert ds.name == f"deepspeed-{gpu_bundle.PURE['deepspeed']}-py3-none-any.whl"
    with zipfile.ZipFile(ds) as z:
        assert not [n for n in z.namelist() if n.endswith(".so")]
        info = z.read("deepspeed/git_version_info_installed.py").decode()
    assert re.search(r"installed_ops=\{[^}]*\}", info) and "True" not in info.split("installed_ops=")[1].split("}")[0]
    # the pure-Python wheels are the very same files in both bundles: what the test installs is what the device gets
    def pure(ws):
        return {w.name: sha(w) for w in ws if gpu_bundle.is_pure_tag(gpu_bundle.wheel_info(w)[2])}
    pure311, pure312 = pure((b311 / "wheels").glob("*.whl")), pure(wheels)
    assert pure311 == pure312 and len(pure312) == len(gpu_bundle.PURE)


def test_build_is_idempotent(bundles):
    b312, _ = bundles
    before = {p: p.stat().st_mtime_ns for p in b312.rglob("*") if p.is_file()}
    proc = build(b312, "3.12")
    assert proc.returncode == 0, proc.stderr
    assert "(0 files copied, 0 stale removed)" in proc.stdout, proc.stdout
    assert {p: p.stat().st_mtime_ns for p in b312.rglob("*") if p.is_file()} == before


def test_build_fails_over_the_size_limit(bundles, tmp_path):
    proc = build(tmp_path / "b", "3.12", "--max-mib", "10")
    assert proc.returncode == 1 and "over the 10 MiB limit" in proc.stderr, proc.stderr


def python312() -> str | None:
    """A working CPython 3.12 with pip: pyenv's (not its shim, which may refuse), else python3.12 on PATH."""
    import shutil

    for py in [*sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")), shutil.which("python3.12")]:
        if py and subprocess.run([str(py), "-c", "import pip"], capture_output=True, timeout=60).returncode == 0:
            return str(py)
    return None


NO_TORCH_IMPORTS = ("pydantic", "pydantic_core", "yaml", "yaml._yaml", "msgpack", "psutil", "hydra", "omegaconf",
                    "antlr4", "submitit", "hjson", "cpuinfo", "einops", "braceexpand", "cloudpickle",
                    "typing_extensions", "typing_inspection", "annotated_types", "packaging", "ninja")


def test_cp312_wheels_install_and_import_on_python_312(bundles, tmp_path):
    """The device's wheels under a real CPython 3.12 (pyenv's, no torch): gpu.sh's pip install accepts every one,
    the compiled ones and everything that needs no torch import, and the project's sources and deepspeed's compile
    under 3.12."""
    b312, _ = bundles
    py = python312()
    if py is None:
        pytest.skip("no python3.12 here (PATH or ~/.pyenv/versions/3.12*)")
    site = tmp_path / "site"
    proc = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps",
                    "--no-compile", "--target", str(site), *map(str, sorted((b312 / "wheels").glob("*.whl")))],
                   check=False, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code = f"""
import importlib, sys
from pathlib import Path
sys.path.insert(0, {str(site)!r})
for m in {NO_TORCH_IMPORTS!r}:
    importlib.import_module(m)
files = [f for d in ({str(site / "deepspeed")!r}, {str(REPO / "csdm_dist")!r}, {str(REPO / "data_prep")!r},
                     {str(REPO / "launch")!r}, {str(REPO / "benchmarks")!r}) for f in Path(d).rglob("*.py")]
for f in files:
    compile(f.read_bytes(), str(f), "exec", dont_inherit=True)
print(sys.version_info[:2], len(files))
"""
    proc = subprocess.run([py, "-I", "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("(3, 12)"), proc.stdout + proc.stderr


# ---- gpu.sh on the stand-in -------------------------------------------------------------------------------------
def gpu_sh(args: list[str], python: Path, env: dict, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU_SH), *args], capture_output=True, text=True, timeout=timeout,
                          env={**env, "PYTHON": str(python)}, cwd=REPO)


def test_stand_in_has_only_the_device_packages(device_python):
    python, env, names = device_python
    assert {"torch", "torchvision", "numpy", "tensorboard", "tqdm", "pip"} <= {gpu_bundle.norm(n) for n in names}
    code = ("import importlib.util as u, torch; "
            "print([m for m in ('deepspeed', 'hydra', 'omegaconf', 'webdataset', 'submitit', 'pydantic', 'yaml', "
            "'psutil', 'csdm_dist') if u.find_spec(m)])")
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_refusals(bundles, device_python, tmp_path):
    b312, b311 = bundles
    python, env, _ = device_python
    cases = {
        "is for Python 3.12, but": [str(tmp_path / "a"), "--bundle", str(b312), "--device", "cpu", "--smoke"],
        "CUDA is not available": [str(tmp_path / "b"), "--bundle", str(b311), "--smoke"],
        "no bundle at": [str(tmp_path / "c"), "--bundle", str(tmp_path / "missing"), "--device", "cpu"],
    }
    for want, args in cases.items():
        proc = gpu_sh(args, python, env, timeout=120)
        lines = proc.stderr.strip().splitlines()  # stdout has at most the bundle's `sha256 ok` line
        assert proc.returncode == 2 and len(lines) == 1 and want in lines[0], (want, proc.stdout, proc.stderr)
        assert len(proc.stdout.strip().splitlines()) <= 1, proc.stdout
    assert not (tmp_path / "a" / "site").exists()  # refused before installing anything


def test_full_run_commands_are_valid(bundles, tmp_path):
    """The GPU run's own commands (gpu.sh --dry-run, full settings, device cuda): every distillation's and build's
    overrides compose into a valid config, and speed.py and quality.py accept their flags. The smoke run below
    executes the same step functions with other settings; this covers the settings only the GPU call uses."""
    import shlex

    from csdm_dist.config import to_config
    from runs import compose_cfg

    _, b311 = bundles
    proc = subprocess.run(["bash", str(GPU_SH), str(tmp_path / "out"), "--bundle", str(b311), "--dry-run"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmds = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
    seen = set()
    for words in cmds:
        words = [w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)]
        if "-m" in words and words[words.index("-m") + 1] == "torch.distributed.run":
            words = words[words.index("-m") + 1:]
            assert "--nproc_per_node=2" in words
        if "-m" in words and words[words.index("-m") + 1] in ("csdm_dist.distill", "data_prep.build"):
            i = len(words) - 1 - words[::-1].index("-m")
            overrides = words[i + 2:]
            cfg = to_config(compose_cfg(overrides))
            seen.add(words[i + 1])
            if words[i + 1] == "csdm_dist.distill" and "device=cuda" in overrides:
                assert cfg.device == "cuda" and cfg.distill.iterations == 100 and cfg.ipc == 10
        elif len(words) > 1 and words[1].endswith(("speed.py", "quality.py")):
            script = REPO / words[1]
            sys.path.insert(0, str(script.parent))
            try:
                import importlib.util

                spec = importlib.util.spec_from_file_location(f"_gpu_{script.stem}", script)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
                mod.parse_args(words[2:])
            finally:
                sys.path.remove(str(script.parent))
            seen.add(script.name)
        elif len(words) > 2 and words[1].endswith("gpu_bundle.py"):
            gpu_bundle.parse_args(words[2:])
            seen.add(words[3])
    checks = {"env", "imports", "distill", "ranks", "speed", "quality"}  # gpu_bundle.py check STEP
    assert seen == {"csdm_dist.distill", "data_prep.build", "speed.py", "quality.py", *checks}, seen


def test_smoke_run_on_the_cpu(bundles, device_python, tmp_path):
    """Every step of gpu.sh --smoke, with the bundle installed by gpu.sh itself into the stand-in python3."""
    _, b311 = bundles
    python, env, _ = device_python
    out = tmp_path / "out"
    proc = gpu_sh([str(out), "--bundle", str(b311), "--device", "cpu", "--smoke"], python, env, timeout=900)
    text = proc.stdout + proc.stderr
    print(text)
    assert proc.returncode == 0, text[-6000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(rf"gpu\.sh: {len(STEPS)} PASS, 0 FAIL in \d+ s", lines[-1]), lines[-1]
    for s in STEPS:
        assert any(line.startswith(f"PASS {s} (") for line in lines), f"no PASS line for {s}:\n{text[-4000:]}"
    site = out / "site"
    assert (site / "deepspeed").is_dir() and not (site / "torch").exists()
    device = (out / "device.txt").read_text()
    assert str(site) in device and f"deepspeed=={gpu_bundle.PURE['deepspeed']}" in device
    quality = json.loads((out / "quality" / "quality.json").read_text())
    assert [r["method"] for r in quality["rows"]] == ["random", "csdm"]
