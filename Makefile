# make run   : install, build Fashion-MNIST-LT (IF 100), distil it with CSDM (IPC 10) and evaluate vs random-real,
#              a quick demonstration (DEMO: 200 steps, one evaluation network)
# make test  : install (and Fashion-MNIST, for the GPU-bundle smoke test), run the test suite (CPU; 2-process tests use gloo)
# Both are idempotent: the venv is rebuilt only when pyproject.toml changes, the dataset only when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST ?= /usr/share/datasets/fashion-mnist
ARGS   ?=
DEMO   ?= distill.iterations=200 eval.repeats=1

.PHONY: install fmnist data run test bench clean gpu-bundle

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

# Fashion-MNIST's raw files: the Debian package where apt runs as root; otherwise torchvision's download.
fmnist:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing dataset-fashion-mnist (apt)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null \
	  || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	fi

data: install fmnist
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  $(PY) -m data_prep.build dataset=fashion_mnist_lt dataset.raw_root=$(FMNIST); \
	else \
	  echo "$(FMNIST) has no Fashion-MNIST: downloading with torchvision into data/raw"; \
	  $(PY) -m data_prep.build dataset=fashion_mnist_lt dataset.raw_root=data/raw/fashion-mnist dataset.download=true; \
	fi

# make run is a quick demonstration of the defaults: a shorter budget and one evaluation network (DEMO); the
# defaults themselves (1000 steps, 2 evaluation networks) are `$(PY) -m csdm_dist.distill`, or make run DEMO=
run: data
	@echo "make run: a quick demonstration ($(DEMO)); drop these for the defaults: make run DEMO="
	$(PY) -m csdm_dist.distill $(DEMO) $(ARGS)

test: install fmnist
	$(PY) -m pytest -q

clean:
	rm -rf runs outputs multirun .pytest_cache

# .gpu/ (git-ignored, <= 48 MiB): wheels for the device's Python 3.12 of what its image lacks, and Fashion-MNIST;
# benchmarks/gpu.sh OUT --bundle .gpu installs and runs it there (docs/gpu.md). Idempotent; wheels are cached in
# ~/.cache/csdm-gpu-wheels ($CSDM_GPU_CACHE).
gpu-bundle: install fmnist
	$(PY) benchmarks/gpu_bundle.py build --out .gpu --fmnist $(FMNIST)
