#!/usr/bin/env bash
# One command for a GPU machine: install the bundle, then check and benchmark this project there (docs/gpu.md).
#   bash benchmarks/gpu.sh OUT_DIR [--bundle DIR] [--device cuda|cpu] [--smoke] [--budget S] [--fmnist DIR]
#                                  [--quality "ARGS"] [--dry-run] [FMNIST_ROOT]
# --bundle DIR  a bundle from `make gpu-bundle` (.gpu): its wheels are installed with
#               `python3 -m pip install --no-index --no-deps --target OUT_DIR/site` (the device's torch, numpy, ...
#               are never touched) and OUT_DIR/site goes on PYTHONPATH; its fashion-mnist/ is the raw data. Without
#               --bundle nothing is installed: python3 (or $PYTHON) must have every dependency already.
# --device cpu  run every step on the CPU (no CUDA needed); default cuda, which must be available.
# --smoke       tiny settings everywhere (a few steps, 1 evaluation epoch): the whole script in minutes on a CPU.
# --budget S    the wall-clock budget of all steps (default 480 s, 900 with --smoke); a step still running when it
#               is spent is stopped and FAILs, and the steps after it are not run (FAIL).
# --quality "ARGS"  the arguments of benchmarks/quality.py instead of the default cells.
# --dry-run     check the bundle, then print every step's commands (`+ ` lines) instead of running them; no CUDA
#               check, nothing installed (tests/gpu checks the full run's commands this way).
# Steps, each a PASS or FAIL line with its numbers: env, imports, build, distill, ranks, speed, quality; the last line
# sums them up (`gpu.sh: 7 PASS, 0 FAIL in 412 s`); exit 0 only when every step passed. Before any step, one clear
# line and exit 2 when: the bundle is missing, is for another Python than python3's, or does not match its manifest;
# CUDA is not available without --device cpu; the Fashion-MNIST files are missing. Everything goes under OUT_DIR:
# logs/<step>.log, summary.txt, device.txt, speed.json, quality/ (quality.md, quality.json), runs/, data/, site/.
set -uo pipefail

usage="usage: bash benchmarks/gpu.sh OUT_DIR [--bundle DIR] [--device cuda|cpu] [--smoke] [--budget S] [--fmnist DIR] [--quality \"ARGS\"] [--dry-run] [FMNIST_ROOT]"
out="" bundle="" device=cuda smoke=0 budget="" fmnist="${FMNIST_ROOT:-}" quality_args="" dry=0
while (($#)); do
  case "$1" in
    --bundle) bundle=${2:?--bundle needs a folder}; shift 2 ;;
    --device) device=${2:?--device needs cuda or cpu}; shift 2 ;;
    --smoke) smoke=1; shift ;;
    --dry-run) dry=1; shift ;;
    --budget) budget=${2:?--budget needs seconds}; shift 2 ;;
    --fmnist) fmnist=${2:?--fmnist needs a folder}; shift 2 ;;
    --quality) quality_args=${2?--quality needs its arguments}; shift 2 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "gpu.sh: unknown option $1; $usage" >&2; exit 2 ;;
    *) if [ -z "$out" ]; then out=$1; elif [ -z "$fmnist" ]; then fmnist=$1; else echo "gpu.sh: $usage" >&2; exit 2; fi
       shift ;;
  esac
done
[ -n "$out" ] || { echo "gpu.sh: $usage" >&2; exit 2; }
case "$device" in cuda|cpu) ;; *) echo "gpu.sh: --device must be cuda or cpu, got $device" >&2; exit 2 ;; esac
[ -n "$budget" ] || budget=$(( smoke ? 900 : 480 ))

repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$(command -v python3 || true)}
[ -n "$py" ] && [ -x "$py" ] || { echo "gpu.sh: no python3 on PATH (or \$PYTHON is not executable)" >&2; exit 2; }
[[ "$py" = /* ]] || py=$PWD/$py  # the steps run in the repository
helper="$repo/benchmarks/gpu_bundle.py"
mkdir -p "$out" && out=$(cd "$out" && pwd) || { echo "gpu.sh: cannot create $out" >&2; exit 2; }
logs=$out/logs
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
t_start=$(date +%s)

# ---- preflight: one clear line and exit 2 ----------------------------------------------------------------------
if [ -n "$bundle" ]; then
  [ -d "$bundle" ] && [ -f "$bundle/MANIFEST.txt" ] || {
    echo "gpu.sh: no bundle at $bundle (no MANIFEST.txt); build it with \`make gpu-bundle\` and carry .gpu" >&2; exit 2; }
  bundle=$(cd "$bundle" && pwd)
  "$py" "$helper" verify "$bundle" || exit 2  # the python tag against $py, the files against the manifest
  [ -n "$fmnist" ] || fmnist=$bundle/fashion-mnist
fi
[ -n "$fmnist" ] || fmnist=/usr/share/datasets/fashion-mnist
if [ "$device" = cuda ] && ! ((dry)); then
  "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 || {
    echo "gpu.sh: CUDA is not available to $py (no torch, or torch.cuda.is_available() is False); run it on a GPU machine, or pass --device cpu" >&2
    exit 2; }
fi
[ -f "$fmnist/train-images-idx3-ubyte.gz" ] || [ -f "$fmnist/train-images-idx3-ubyte" ] || {
  echo "gpu.sh: no Fashion-MNIST idx files in $fmnist; pass --bundle .gpu (its fashion-mnist/) or --fmnist DIR" >&2; exit 2; }
if [ -n "$bundle" ] && ((dry)); then
  site=$out/site
  export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
elif [ -n "$bundle" ]; then
  site=$out/site
  stamp=$(sha256sum "$bundle/MANIFEST.txt" | cut -d' ' -f1)
  if [ "$(cat "$site/.bundle" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$site"
    t0=$(date +%s)
    "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$site" "$bundle"/wheels/*.whl \
      >"$logs/install.log" 2>&1 || {
      echo "gpu.sh: installing the bundle's wheels into $site failed (see $logs/install.log): $(tail -1 "$logs/install.log")" >&2
      exit 2; }
    for held in torch torchvision numpy PIL tensorboard tqdm scipy; do
      [ ! -e "$site/$held" ] || { echo "gpu.sh: the bundle installed $held into $site; it must come from the device" >&2; exit 2; }
    done
    echo "$stamp" >"$site/.bundle"
    echo "installed $(ls "$bundle"/wheels/*.whl | wc -l) wheels into $site in $(( $(date +%s) - t0 )) s"
  else
    echo "the bundle is installed in $site already"
  fi
  export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
  "$py" -c "import deepspeed, hydra, omegaconf, webdataset, submitit" >/dev/null 2>&1 || {
    echo "gpu.sh: $py lacks this project's dependencies (deepspeed, hydra-core, webdataset, submitit) and no --bundle was given; build one with \`make gpu-bundle\` and pass --bundle .gpu" >&2
    exit 2; }
fi
cd "$repo"
# DeepSpeed picks its accelerator by itself (CUDA whenever CUDA is there) and would then move a device=cpu run's
# images to cuda:LOCAL_RANK; every CPU run here names the CPU accelerator
[ "$device" = cpu ] && export DS_ACCELERATOR=cpu

# ---- settings ---------------------------------------------------------------------------------------------------
data=(dataset=fashion_mnist_lt "dataset.raw_root=$fmnist" "dataset.data_root=$out/data" dataset.imbalance_factor=100)
tiny=(extractor.width=16 extractor.depth=2 method.kernel.num_freqs=64 distill.real_per_class=8 eval.test_batch_size=256)
# the ranks check: tests/distributed's comparison (1 rank against 2 ranks, gloo on the CPU, lr 0.01)
ranks_over=(ipc=3 "${tiny[@]}" distill.lr=0.01 distill.log_every=1 distill.image_every=0 evaluate=false device=cpu
  precision=fp32)  # the 1 == 2 ranks tolerance is fp32 summation order (tests/distributed: bf16 has its own)
if ((smoke)); then
  distill_steps=3 distill_over=(ipc=2 "${tiny[@]}" eval.epochs=1 eval.repeats=1 distill.image_every=0) min_acc=0
  ranks_steps=3
  speed_args=(--device cpu --steps 1 --warmup 0 --wait-idle 0 --retries 0 --override extractor.width=16
              --override distill.real_per_class=8 --override method.kernel.num_freqs=32)
  quality_cells="" quality_min=0
  [ -n "$quality_args" ] || { quality_args="--quick --if 100 --methods random csdm --steps 2 -- eval.epochs=1 ${tiny[*]}"; quality_cells=2; }
else
  distill_steps=100 distill_over=(ipc=10 eval.epochs=100 eval.repeats=1) min_acc=50
  ranks_steps=6
  speed_args=(--device "$device" --wait-idle 0)
  quality_cells="" quality_min=50
  [ -n "$quality_args" ] || { quality_args="--if 100 --methods random dm ncfm csdm"; quality_cells=4; }
fi
if ! ((dry)); then
  [ "$(cat "$out/runs/.mode" 2>/dev/null)" = "$smoke $device" ] || rm -rf "$out/runs" "$out/quality"
  mkdir -p "$out/runs" && echo "$smoke $device" >"$out/runs/.mode"
  rm -rf "$out/runs/distill" "$out/runs/ranks"  # this invocation's own runs, made again
fi

# ---- steps ------------------------------------------------------------------------------------------------------
deadline=$(( t_start + budget ))
npass=0 nfail=0
: >"$out/summary.txt"
# lim CMD...: CMD under the time left in the budget (its whole process group is stopped when that runs out)
lim() {
  if ((dry)); then
    echo "+ ${DS_ACCELERATOR:+DS_ACCELERATOR=$DS_ACCELERATOR }${OMP_NUM_THREADS:+OMP_NUM_THREADS=$OMP_NUM_THREADS }$(printf '%q ' "$@")"
    return 0
  fi
  local left=$(( deadline - $(date +%s) )); (( left > 0 )) || return 124; timeout -k 10 "$left" "$@"
}
# check STEP ARGS...: the helper's check, its one line marked for the summary
check() {
  local line rc
  if ((dry)); then lim "$py" "$helper" check "$@"; echo "RESULT dry run"; return 0; fi
  line=$(lim "$py" "$helper" check "$@" 2>&1); rc=$?; echo "$line"; echo "RESULT ${line##*$'\n'}"; return $rc
}
free_port() { "$py" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

step_env() { check env --site "${site:-}" --write "$out/device.txt"; }
step_imports() { check imports; }
step_build() {
  lim "$py" -m data_prep.build "${data[@]}" || return
  local m=$out/data/fashion_mnist_lt-if100-seed0/manifest.json
  if ((dry)); then echo "RESULT dry run"; return 0; fi
  "$py" -c "import json, sys; m = json.load(open(sys.argv[1])); print('RESULT', ', '.join(f'{k} {v[\"num_samples\"]} images in {len(v[\"shards\"])} shards' for k, v in m.items() if isinstance(v, dict) and 'shards' in v), 'in', sys.argv[1].rsplit('/', 1)[0])" "$m"
}
step_distill() {
  lim "$py" -m csdm_dist.distill "${data[@]}" "${distill_over[@]}" "distill.iterations=$distill_steps" \
    "device=$device" "out_dir=$out/runs/distill" || return
  check distill "$out/runs/distill" --steps "$distill_steps" --min-acc "$min_acc"
}
step_ranks() {
  local r=$out/runs/ranks start=()
  DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 lim "$py" -m csdm_dist.distill "${data[@]}" "${ranks_over[@]}" "distill.iterations=$ranks_steps" \
    "out_dir=$r/one" || return
  DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 lim "$py" -m torch.distributed.run --nproc_per_node=2 --master_addr=127.0.0.1 \
    "--master_port=$(free_port)" -m csdm_dist.distill "${data[@]}" "${ranks_over[@]}" \
    "distill.iterations=$ranks_steps" "out_dir=$r/two" || return
  if ! ((smoke)); then
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 lim "$py" -m csdm_dist.distill "${data[@]}" "${ranks_over[@]}" distill.iterations=0 \
      "out_dir=$r/start" || return
    start=(--start "$r/start")
  fi
  check ranks "$r/one" "$r/two" "${start[@]}" --steps "$ranks_steps"
}
step_speed() {
  lim "$py" benchmarks/speed.py "${speed_args[@]}" --out "$out/speed.json" || return
  check speed "$out/speed.json"
}
step_quality() {
  local -a qa
  read -r -a qa <<<"$quality_args"
  local -a head=("${qa[@]}") extra=()
  local i
  for i in "${!qa[@]}"; do  # quality.py's flags, then `--` and the Hydra overrides of every distillation
    if [ "${qa[$i]}" = "--" ]; then head=("${qa[@]:0:$i}"); extra=("${qa[@]:$i}"); break; fi
  done
  lim "$py" benchmarks/quality.py "${head[@]}" --device "$device" --raw-root "$fmnist" --data-root "$out/data" \
    --out-dir "$out/quality" "${extra[@]}" || return
  check quality "$out/quality/quality.json" --min-acc "$quality_min" ${quality_cells:+--cells "$quality_cells"}
}

run_step() {
  local name=$1 t0 rc line secs
  t0=$(date +%s)
  echo "== $name (budget left $(( deadline - t0 )) s)"
  if (( deadline - t0 < 5 )); then
    rc=124; line="not run: the ${budget} s budget is spent"; : >"$logs/$name.log"
  else
    "step_$name" >"$logs/$name.log" 2>&1
    rc=$?
    if ((dry)); then grep '^+ ' "$logs/$name.log"; return; fi
    line=$(grep '^RESULT ' "$logs/$name.log" | tail -1 | cut -c8-)
    (( rc == 124 || rc == 137 )) && line="timed out: stopped when the ${budget} s budget ran out; ${line}"
  fi
  secs=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    npass=$(( npass + 1 )); line="PASS $name (${secs} s): $line"
  else
    nfail=$(( nfail + 1 )); line="FAIL $name (${secs} s, exit $rc): ${line:-see $logs/$name.log}"
  fi
  echo "$line" | tee -a "$out/summary.txt"
  if (( rc != 0 )) && [ -s "$logs/$name.log" ]; then
    echo "  --- last lines of $logs/$name.log ---"; grep -v '^RESULT ' "$logs/$name.log" | tail -n 15 | sed 's/^/  | /'
  fi
}

echo "gpu.sh: $( ((dry)) && echo "dry run of a " )$( ((smoke)) && echo smoke || echo full ) run on $device, budget $budget s, python $py; results in $out"
for s in env imports build distill ranks speed quality; do run_step "$s"; done
total=$(( $(date +%s) - t_start ))
if ((dry)); then echo "gpu.sh: dry run: the commands of 7 steps printed, nothing run"; exit 0; fi
echo "gpu.sh: $npass PASS, $nfail FAIL in $total s" | tee -a "$out/summary.txt"
(( nfail == 0 ))
