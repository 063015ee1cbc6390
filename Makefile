# Two commands for a new user: `make demo` and `make test`. Both create .venv on first use.
#
# PyTorch goes in first and pinned: on a CPU-only machine `pip install torch==2.13.0` takes the CPU
# build (this project's CI machines have it on disk); on a Linux GPU machine the same line takes
# PyPI's CUDA build. Set TORCH="torch==X.Y.Z" (or TORCH=skip to keep one you installed) to choose.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dapo-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ "$(TORCH)" != "skip" ] && ! $(PY) -c "import torch" 2>/dev/null; then $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dapo train

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache
