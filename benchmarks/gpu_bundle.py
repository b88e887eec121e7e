"""The GPU bundle: what the device machine lacks to run this project, as one folder that travels with the tree.

    python benchmarks/gpu_bundle.py build                      # .gpu/: Python 3.12, manylinux x86_64 (make gpu-bundle)
    python benchmarks/gpu_bundle.py build --python 3.11 --out /tmp/b   # the same bundle for this machine's Python
    python benchmarks/gpu_bundle.py verify .gpu                # files against MANIFEST.txt, python tag against python3
    python benchmarks/gpu_bundle.py check STEP ...             # the checks benchmarks/gpu.sh prints PASS / FAIL from
    python benchmarks/gpu_bundle.py torch-api --old DIR        # torch names used here that an older torch lacks

`build` writes OUT (default .gpu, git-ignored, at most 48 MiB):
- wheels/: one wheel of each distribution in PURE and COMPILED, at the versions pinned there (pyproject.toml's pins;
  the transitive ones as installed in .venv). The device's image has torch 2.11 (CUDA), torchvision 0.26, numpy,
  scipy, pillow, tensorboard and tqdm (DEVICE_HAS); the bundle carries the rest, also the small ones the image
  happens to hold today (psutil, pyyaml, msgpack, ninja, einops, cloudpickle, py-cpuinfo, packaging,
  typing-extensions), so that a change of the image cannot break the one GPU call. PURE wheels are
  py3-none-any, the same files for every Python; COMPILED ones are cp3XY (or abi3) manylinux x86_64 wheels for
  --python. deepspeed and antlr4-python3-runtime have no wheel on PyPI: they are built here from their sdist
  (`pip wheel`, deepspeed with DS_BUILD_OPS=0: no C++ op compiled, py3-none-any; the build is checked).
- fashion-mnist/: the four idx .gz files (from /usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist).
- MANIFEST.txt: the python tag, then `sha256  size  path` of every file.
Every wheel comes through a cache (--cache, default $CSDM_GPU_CACHE or ~/.cache/csdm-gpu-wheels): a wheel found
there is used as it is, else `pip download` (or `pip wheel`) fetches it from the package index into it. A second
build copies nothing that is there and matches (sha256), and removes wheels that are not in the set.
Exit status: 0 done, 1 a check failed (size over the limit, a wheel that is not what it should be), 3 a wheel is
neither in the cache nor to be had from the index (offline); the message names it.

`verify` and `check` use the standard library only at import (they run on the device under its own python3).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MIB = 48
# pure-Python distributions (py3-none-any), pinned: pyproject.toml's pins, the rest as .venv has them (pip freeze)
PURE = {
    "deepspeed": "0.19.8", "hydra-core": "1.3.8", "omegaconf": "2.3.1", "antlr4-python3-runtime": "4.9.3",
    "hydra-submitit-launcher": "1.2.0", "submitit": "1.5.4", "cloudpickle": "3.1.3", "webdataset": "1.0.2",
    "braceexpand": "0.1.7", "pydantic": "2.14.4", "annotated-types": "0.8.0", "typing-inspection": "0.4.5",
    "typing-extensions": "4.16.0", "hjson": "3.1.0", "py-cpuinfo": "9.0.0", "einops": "0.8.2", "packaging": "26.4",
}
# compiled: a wheel per Python (cp3XY or abi3) and platform
COMPILED = {"pydantic-core": "2.50.5", "psutil": "7.2.2", "msgpack": "1.2.4", "pyyaml": "6.0.4", "ninja": "1.13.2"}
SDIST_ONLY = {"deepspeed", "antlr4-python3-runtime"}  # no wheel on PyPI: built from the sdist with `pip wheel`
# on the device already (its image, 'cuda'): never bundled, never installed over; the test gives them from .venv
DEVICE_HAS = ("torch", "torchvision", "numpy", "scipy", "pillow", "tensorboard", "tqdm")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")
FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz")
FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
MANIFEST = "MANIFEST.txt"


class Unavailable(Exception):
    """A wheel is neither in the cache nor to be had from the index."""


class BadWheel(Exception):
    """A wheel is not what the bundle needs (wrong tag, compiled code in a pure wheel, a DeepSpeed op built)."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def default_cache() -> Path:
    return Path(os.environ.get("CSDM_GPU_CACHE") or Path.home() / ".cache" / "csdm-gpu-wheels")


# ---- build ------------------------------------------------------------------------------------------------------
def supported_tags(python: str) -> set:
    """The wheel tags a CPython `python` (e.g. "3.12") on manylinux x86_64 accepts, as pip computes them."""
    from packaging import tags

    ver = tuple(int(x) for x in python.split("."))
    cp = f"cp{ver[0]}{ver[1]}"
    out = set(tags.cpython_tags(python_version=ver, abis=[cp], platforms=PLATFORMS))
    out |= set(tags.compatible_tags(python_version=ver, interpreter=cp, platforms=PLATFORMS))
    return out


def wheel_info(path: Path) -> tuple[str, str, frozenset]:
    from packaging.utils import parse_wheel_filename

    name, version, _build, tags = parse_wheel_filename(path.name)
    return norm(name), str(version), tags


def find_cached(cache: Path, name: str, version: str, accept: set, pure: bool) -> Path | None:
    from packaging.utils import InvalidWheelFilename

    for whl in sorted(cache.glob("*.whl")):
        try:
            n, v, tags = wheel_info(whl)
        except InvalidWheelFilename:  # a file pip would not install either: not a candidate
            continue
        if n == norm(name) and v == version and tags & accept and (not pure or is_pure_tag(tags)):
            return whl
    return None


def is_pure_tag(tags) -> bool:
    return all(t.abi == "none" and t.platform == "any" for t in tags)


def pip(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})


def fetch(cache: Path, name: str, version: str, python: str, pure: bool) -> Path:
    """The cached wheel of name==version for `python`, fetched (or built) into the cache first when missing."""
    accept = supported_tags(python)
    hit = find_cached(cache, name, version, accept, pure)
    if hit:
        return hit
    cache.mkdir(parents=True, exist_ok=True)
    spec = f"{name}=={version}"
    with tempfile.TemporaryDirectory(prefix="csdm-gpu-wheel-") as tmp:
        if name in SDIST_ONLY:
            print(f"  building {spec} from its sdist (pip wheel, DS_BUILD_OPS=0, pip's own caches off)", flush=True)
            proc = pip("wheel", "-q", "--no-deps", "--no-cache-dir", "--no-binary", name, spec, "-w", tmp,
                       env={"DS_BUILD_OPS": "0", "DS_BUILD_STRING": ""})
        else:
            print(f"  downloading {spec} for Python {python}", flush=True)
            ver = python.replace(".", "")
            proc = pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python,
                       "--implementation", "cp", "--abi", f"cp{ver}",
                       *[a for p in PLATFORMS for a in ("--platform", p)], spec, "-d", tmp)
        got = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not got:
            why = (proc.stderr or proc.stdout).strip().splitlines()
            raise Unavailable(f"{spec} for Python {python} is not in the cache {cache} and pip could not fetch it "
                              f"({why[-1] if why else 'no wheel'}); build where the package index is reachable, or "
                              f"fill the cache")
        whl = got[0]
        n, v, tags = wheel_info(whl)
        if not (tags & accept) or (pure and not is_pure_tag(tags)):
            raise BadWheel(f"{whl.name}: not a {'py3-none-any' if pure else 'Python ' + python} wheel")
        dest = cache / whl.name
        shutil.move(str(whl), dest)
        return dest


def check_wheel(whl: Path, pure: bool) -> None:
    """A pure wheel holds no compiled code and says Root-Is-Purelib; deepspeed's holds no built op."""
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        if pure:
            compiled = [n for n in names if n.endswith((".so", ".pyd", ".dylib"))]
            wheel_meta = next(z.read(n).decode() for n in names if n.endswith(".dist-info/WHEEL"))
            if compiled or "Root-Is-Purelib: true" not in wheel_meta:
                raise BadWheel(f"{whl.name} should be pure Python: {compiled[:3] or 'Root-Is-Purelib is not true'}")
        if whl.name.startswith("deepspeed-"):
            info = z.read("deepspeed/git_version_info_installed.py").decode()
            ops = re.search(r"installed_ops=(\{.*\})", info)
            built = [k for k, v in eval(ops.group(1), {}).items() if v] if ops else ["(no installed_ops)"]  # noqa: S307
            if built:
                raise BadWheel(f"{whl.name} has C++ ops built in ({built}); rebuild it with DS_BUILD_OPS=0")


def copy_if_changed(src: Path, dest: Path) -> bool:
    """Copy src to dest unless dest is there with the same content; whether it copied."""
    if dest.is_file() and dest.stat().st_size == src.stat().st_size and sha256(dest) == sha256(src):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return True


def manifest_text(out: Path, python: str, files: list[Path]) -> str:
    rows = [(sha256(f), f.stat().st_size, f.relative_to(out).as_posix()) for f in files]
    total = sum(r[1] for r in rows)
    ver = python.replace(".", "")
    lines = ["# csdm-dist GPU bundle, written by benchmarks/gpu_bundle.py build; installed and run by",
             "# benchmarks/gpu.sh OUT --bundle DIR (docs/gpu.md)",
             f"python: {python}", f"tag: cp{ver}", "platform: manylinux x86_64 (" + ", ".join(PLATFORMS[:3]) + ", ...)",
             f"deepspeed: {PURE['deepspeed']} py3-none-any, no C++ ops (DS_BUILD_OPS=0)",
             "device_has: " + " ".join(DEVICE_HAS),
             f"files: {len(rows)}, {total} bytes ({total / 2**20:.1f} MiB) besides this file",
             "", "# sha256  bytes  path"]
    lines += [f"{h}  {n}  {p}" for h, n, p in rows]
    return "\n".join(lines) + "\n"


def build(args) -> int:
    out, cache, python = Path(args.out), Path(args.cache), args.python
    if not re.fullmatch(r"3\.\d+", python):
        print(f"gpu_bundle: --python must look like 3.12, got {python!r}", file=sys.stderr)
        return 1
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"gpu_bundle: building {out} for Python {python} (cache {cache})", flush=True)
    want: list[Path] = []
    try:
        for group, pure in ((PURE, True), (COMPILED, False)):
            for name, version in group.items():
                whl = fetch(cache, name, version, python, pure)
                check_wheel(whl, pure)
                want.append(whl)
    except Unavailable as e:
        print(f"gpu_bundle: {e}", file=sys.stderr)
        return 3
    except BadWheel as e:
        print(f"gpu_bundle: {e}", file=sys.stderr)
        return 1
    copied = sum(copy_if_changed(w, wheels / w.name) for w in want)
    stale = [p for p in wheels.iterdir() if p.name not in {w.name for w in want}]
    for p in stale:
        p.unlink()
    files = [wheels / w.name for w in want]
    if not args.no_data:
        src = Path(args.fmnist)
        missing = [f for f in FMNIST_FILES if not (src / f).is_file()]
        if missing:
            print(f"gpu_bundle: {src} lacks {', '.join(missing)}; install them with `apt-get install -y "
                  f"dataset-fashion-mnist` (as root; `make gpu-bundle` does), or pass --fmnist DIR", file=sys.stderr)
            return 1
        copied += sum(copy_if_changed(src / f, out / "fashion-mnist" / f) for f in FMNIST_FILES)
        files += [out / "fashion-mnist" / f for f in FMNIST_FILES]
    elif (out / "fashion-mnist").exists():
        shutil.rmtree(out / "fashion-mnist")
    text = manifest_text(out, python, files)
    mpath = out / MANIFEST
    if not mpath.is_file() or mpath.read_text() != text:
        mpath.write_text(text)
    total = sum(f.stat().st_size for f in files) + mpath.stat().st_size
    limit = args.max_mib * 2**20
    print(f"gpu_bundle: {out}: {len(want)} wheels, {'no data' if args.no_data else 'Fashion-MNIST'}, "
          f"{total / 2**20:.1f} MiB ({copied} files copied, {len(stale)} stale removed); Python {python}")
    if total > limit:
        big = sorted(files, key=lambda f: -f.stat().st_size)[:5]
        print(f"gpu_bundle: {out} is {total / 2**20:.1f} MiB, over the {args.max_mib:g} MiB limit (the largest: "
              + ", ".join(f"{f.name} {f.stat().st_size / 2**20:.1f} MiB" for f in big) + ")", file=sys.stderr)
        return 1
    return 0


# ---- verify (on the device: standard library only) --------------------------------------------------------------
def read_manifest(bundle: Path) -> tuple[dict, list[tuple[str, int, str]]]:
    head, rows = {}, []
    for line in (bundle / MANIFEST).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([0-9a-f]{64})  (\d+)  (\S+)", line)
        if m:
            rows.append((m.group(1), int(m.group(2)), m.group(3)))
        elif ": " in line:
            k, v = line.split(": ", 1)
            head[k] = v
    return head, rows


def verify(args) -> int:
    """One line: the bundle's files match its manifest and its python tag is this interpreter's; else exit 2."""
    bundle = Path(args.bundle)
    if not (bundle / MANIFEST).is_file():
        print(f"gpu.sh: no bundle at {bundle} ({MANIFEST} is missing); build it with `make gpu-bundle` "
              "(benchmarks/gpu_bundle.py build)", file=sys.stderr)
        return 2
    head, rows = read_manifest(bundle)
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if head.get("python") != here:
        print(f"gpu.sh: the bundle {bundle} is for Python {head.get('python')}, but {sys.executable} is Python "
              f"{here}; build one for it with `python benchmarks/gpu_bundle.py build --python {here} --out DIR`",
              file=sys.stderr)
        return 2
    bad = [p for h, n, p in rows if not (bundle / p).is_file() or (bundle / p).stat().st_size != n
           or sha256(bundle / p) != h]
    listed = {p for _, _, p in rows}
    extra = sorted(p.relative_to(bundle).as_posix() for p in (bundle / "wheels").glob("*.whl")
                   if p.relative_to(bundle).as_posix() not in listed)
    if bad or extra:
        print(f"gpu.sh: the bundle {bundle} does not match its {MANIFEST}: "
              + (f"{len(bad)} file(s) missing or changed ({', '.join(bad[:3])})" if bad else "")
              + ("; " if bad and extra else "") + (f"unlisted wheels {', '.join(extra[:3])}" if extra else "")
              + "; rebuild it with `make gpu-bundle`", file=sys.stderr)
        return 2
    size = sum(n for _, n, _ in rows)
    print(f"bundle {bundle}: {len(rows)} files, {size / 2**20:.1f} MiB, sha256 ok, Python {here}")
    return 0


# ---- checks (on the device: standard library at import; each prints one line, exit 0 = PASS) -------------------
def check_env(args) -> int:
    import importlib
    import importlib.metadata as md

    import torch

    site = Path(args.site).resolve() if args.site else None
    lines, bad = [], []
    for dist in (*PURE, *COMPILED):
        try:
            v = md.version(dist)
        except md.PackageNotFoundError:
            bad.append(f"{dist} missing")
            continue
        want = PURE.get(dist) or COMPILED.get(dist)
        if v != want and site:  # with a bundle every pin holds; without one the versions are only reported
            bad.append(f"{dist} {v} (bundle {want})")
        lines.append(f"{dist}=={v}")
    torch_dir = Path(torch.__file__).resolve().parent
    if site and site in torch_dir.parents:
        bad.append(f"torch comes from the bundle ({torch_dir})")
    ds = importlib.import_module("deepspeed")
    ds_dir = Path(ds.__file__).resolve().parent
    if site and site not in ds_dir.parents:
        bad.append(f"deepspeed comes from {ds_dir}, not the bundle")
    cuda = torch.cuda.is_available()
    dev = torch.cuda.get_device_name(0) if cuda else "no CUDA"
    text = (f"python {sys.version.split()[0]}, torch {torch.__version__} ({torch_dir}), {dev}, "
            f"cuda {torch.version.cuda}, deepspeed {ds.__version__} from {ds_dir.parent}")
    if args.write:
        Path(args.write).write_text(text + "\n" + "\n".join(lines) + "\n")
    print(text + (f"; PROBLEMS: {', '.join(bad)}" if bad else f"; {len(lines)} bundled distributions at their pins"))
    return 1 if bad else 0


def check_imports(args) -> int:
    """Import every module of csdm_dist, data_prep and launch.submit, plus what they import lazily."""
    import importlib
    import pkgutil

    names = []
    for pkg in ("csdm_dist", "data_prep"):
        mod = importlib.import_module(pkg)
        names += [pkg] + [m.name for m in pkgutil.walk_packages(mod.__path__, pkg + ".")]
    names += ["launch.submit", "deepspeed", "deepspeed.comm.torch", "webdataset", "hydra", "omegaconf", "submitit",
              "hydra_plugins.hydra_submitit_launcher.submitit_launcher", "psutil", "torchvision.utils",
              "torch.utils.tensorboard", "tensorboard.backend.event_processing.event_accumulator"]
    failed = []
    for n in names:
        try:
            importlib.import_module(n)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            failed.append(f"{n}: {type(e).__name__}: {e}")
    print(f"{len(names) - len(failed)} of {len(names)} modules imported"
          + (f"; FAILED: {' | '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def results(run: Path) -> dict:
    return json.loads((Path(run) / "results.json").read_text())


def check_distill(args) -> int:
    r = results(args.run)
    acc, steps = r.get("accuracy", {}), r["timing"]["steps"]
    mean = acc.get("mean", float("nan"))
    base = r.get("baseline_random", {}).get("mean")
    ok = steps == args.steps and math.isfinite(mean) and mean >= args.min_acc
    hw = r.get("hardware", {})
    print(f"{steps} steps in {r['timing']['distill_s']:.1f} s ({r['timing']['step_ms_median'] or 0:.0f} ms/step) on "
          f"{hw.get('gpu') or hw.get('device')}; "
          f"accuracy {mean:.2f} % (random-real {base if base is None else f'{base:.2f}'} %, pass at >= "
          f"{args.min_acc:g} % and {args.steps} steps), eval {r['timing'].get('eval_s', 0):.1f} s")
    return 0 if ok else 1


def check_ranks(args) -> int:
    """1 rank against 2 ranks: the distilled images and the per-step losses (tests/distributed's comparison)."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def losses(run: Path) -> dict:
        acc = EventAccumulator(str(Path(run) / "tb"), size_guidance={"scalars": 0})
        acc.Reload()
        return {e.step: e.value for e in acc.Scalars("distill/loss")}

    one, two = Path(args.one), Path(args.two)
    world = (results(one)["world_size"], results(two)["world_size"])
    a = torch.load(one / "distilled.pt", weights_only=False)["images"]
    b = torch.load(two / "distilled.pt", weights_only=False)["images"]
    start = torch.load(Path(args.start) / "distilled.pt", weights_only=False)["images"] if args.start else None
    diff = (a - b).abs().max().item() if a.shape == b.shape else float("inf")
    moved = (a - start).abs().max().item() if start is not None else float("nan")
    l1, l2 = losses(one), losses(two)
    same_steps = sorted(l1) == sorted(l2) == list(range(1, args.steps + 1))
    rel = max((abs(l1[s] - l2[s]) / max(abs(l1[s]), 1e-6) for s in l1), default=float("inf")) if same_steps \
        else float("inf")
    ok = world == (1, 2) and diff <= args.atol and rel <= args.rtol and same_steps \
        and (start is None or moved > 100 * args.atol)
    print(f"world sizes {world[0]} and {world[1]}, {args.steps} steps: max |image diff| {diff:.3g} (tol "
          f"{args.atol:g}{'' if start is None else f'; the images moved {moved:.3g}'}), max relative loss diff "
          f"{rel:.3g} (tol {args.rtol:g})")
    return 0 if ok else 1


def check_speed(args) -> int:
    rep = json.loads(Path(args.json).read_text())
    rows, parts = rep.get("results", []), []
    for r in rows:
        ratio = r.get("ratio")
        target = r.get("target_ratio")
        met = "met" if ratio is not None and target is not None and ratio <= target else "not met"
        gpu = f" ({r['gpu']})" if r.get("gpu") else ""
        parts.append(f"{r['device']}{gpu} {r.get('precision', '?')}: step {r['step_s'] * 1e3:.1f} ms, "
                     f"floor {r['floor_s'] * 1e3:.1f} ms, step/floor {ratio:.2f}x (target <= {target}x: {met}), "
                     f"{r['warmup_steps']} + {r['steps']} steps")
    print("; ".join(parts) if parts else f"no measurements in {args.json}")
    return 0 if parts else 1


def check_quality(args) -> int:
    rep = json.loads(Path(args.json).read_text())
    rows = rep.get("rows", [])
    cells = [f"IF {r['imbalance_factor']:g} {r['method']} {r['mean']:.2f} +- {r['std']:.2f}" for r in rows]
    ok = bool(rows) and all(math.isfinite(r["mean"]) and r["mean"] >= args.min_acc for r in rows) \
        and (args.cells is None or len(rows) == args.cells)
    print(f"{len(rows)} cells ({rep.get('mode')} mode, {rep.get('split')} split, {rep.get('total_s', 0):.0f} s): "
          + "; ".join(cells) + f" (pass at >= {args.min_acc:g} % each)")
    return 0 if ok else 1


# ---- torch-api: the project's use of torch against an older torch's Python sources -------------------------------
def _defined(root: Path) -> tuple[set, dict]:
    """Every name a torch source tree defines (functions, classes, assignments, imports, module files, string
    constants such as __all__ entries) and the parameters of each function name, from its .py and .pyi files."""
    import ast

    names, params = set(), {}
    for f in root.rglob("*.py*"):
        if f.suffix not in (".py", ".pyi"):
            continue
        names.add(f.stem)
        try:
            tree = ast.parse(f.read_text(errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
                if not isinstance(node, ast.ClassDef):
                    a = node.args
                    params.setdefault(node.name, set()).update(
                        [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + (["**"] if a.kwarg else []))
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names.update(n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(t)
                                 if isinstance(n, (ast.Name, ast.Attribute)))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[-1] for a in node.names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                names.add(node.value)
    return names, params


def torch_api(args) -> int:
    """What the project uses of torch that the torch at --old does not define: a static check, by name."""
    import ast
    import importlib

    import torch

    new_root, old_root = Path(torch.__file__).parent, Path(args.old)
    new_names, new_params = _defined(new_root)
    old_names, old_params = _defined(old_root)
    only_new = new_names - old_names
    files = [f for d in ("csdm_dist", "data_prep", "launch", "benchmarks") for f in (ROOT / d).rglob("*.py")]
    attrs, keywords, chains = set(), set(), set()
    for f in files:
        tree = ast.parse(f.read_text())
        alias = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                alias.update({a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0]
                              for a in node.names if a.name.split(".")[0] == "torch"})
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
                alias.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
                chains.update(f"{node.module}.{a.name}" for a in node.names)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                attrs.add(node.attr)
                parts, n = [], node
                while isinstance(n, ast.Attribute):
                    parts.append(n.attr)
                    n = n.value
                if isinstance(n, ast.Name) and n.id in alias:
                    chains.add(".".join([alias[n.id], *reversed(parts)]))
            elif isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
                keywords.update((name, k.arg) for k in node.keywords if k.arg and name)
    missing = []
    for c in sorted(chains):  # torch.a.b.c: the module torch.a.b must exist there and define c
        parts = c.split(".")
        i = len(parts)
        while i > 1:
            try:
                importlib.import_module(".".join(parts[:i]))
                break
            except Exception:  # noqa: BLE001 - not a module: an attribute
                i -= 1
        where = old_root.parent.joinpath(*parts[:i])
        if not any(p.exists() for p in (where.with_suffix(".py"), where.with_suffix(".pyi"), where / "__init__.py")):
            missing.append(f"{c} (no module {'.'.join(parts[:i])})")
        elif i < len(parts) and parts[i] not in old_names:
            missing.append(c)
    new_kw = sorted(f"{n}({k}=)" for n, k in keywords if k in new_params.get(n, ()) and n in old_params
                    and k not in old_params[n] and "**" not in old_params[n])
    print(f"torch {torch.__version__} ({new_root}) against {old_root}: {len(files)} project files, {len(chains)} "
          f"dotted torch names, {len(only_new)} names only the newer torch defines")
    print(f"dotted torch names the older torch lacks: {missing or 'none'}")
    print(f"keywords only the newer signatures take: {new_kw or 'none'}")
    print(f"identifiers of the project that only the newer torch defines (check each by hand; most are the "
          f"project's own or the standard library's): {sorted(attrs & only_new) or 'none'}")
    return 1 if missing or new_kw else 0


# ---- command line -----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the bundle")
    b.add_argument("--out", default=str(ROOT / ".gpu"))
    b.add_argument("--python", default="3.12", help="the device's Python, major.minor (default 3.12)")
    b.add_argument("--cache", default=str(default_cache()), help="wheel cache ($CSDM_GPU_CACHE)")
    b.add_argument("--fmnist", default=FMNIST_ROOT, help="folder of the four Fashion-MNIST idx .gz files")
    b.add_argument("--no-data", action="store_true", help="wheels only (no fashion-mnist/)")
    b.add_argument("--max-mib", type=float, default=MAX_MIB)
    v = sub.add_parser("verify", help="check a bundle against its manifest and this interpreter")
    v.add_argument("bundle")
    c = sub.add_parser("check", help="gpu.sh's checks; each prints one line, exit 0 = PASS")
    cs = c.add_subparsers(dest="step", required=True)
    e = cs.add_parser("env")
    e.add_argument("--site", default=None)
    e.add_argument("--write", default=None)
    cs.add_parser("imports")
    d = cs.add_parser("distill")
    d.add_argument("run")
    d.add_argument("--steps", type=int, required=True)
    d.add_argument("--min-acc", type=float, default=0.0)
    r = cs.add_parser("ranks")
    r.add_argument("one")
    r.add_argument("two")
    r.add_argument("--start", default=None, help="a 0-step run: the images must have moved")
    r.add_argument("--steps", type=int, required=True)
    r.add_argument("--atol", type=float, default=1e-4)
    r.add_argument("--rtol", type=float, default=1e-4)
    s = cs.add_parser("speed")
    s.add_argument("json")
    q = cs.add_parser("quality")
    q.add_argument("json")
    q.add_argument("--min-acc", type=float, default=0.0)
    q.add_argument("--cells", type=int, default=None)
    t = sub.add_parser("torch-api", help="the project's torch names against an older torch's Python sources")
    t.add_argument("--old", required=True, help="the torch/ folder of the older torch (its .py and .pyi files)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cmd == "build":
        return build(args)
    if args.cmd == "verify":
        return verify(args)
    if args.cmd == "torch-api":
        return torch_api(args)
    return {"env": check_env, "imports": check_imports, "distill": check_distill, "ranks": check_ranks,
            "speed": check_speed, "quality": check_quality}[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
