# babyllama: two commands on a fresh machine (Python >= 3.10 and a C compiler):
#   make run    # set up .venv, then the whole book end to end on the built-in corpus
#   make test   # set up .venv, then every test: pytest --nbval over tests/ and book/
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test lint bench notebooks c clean cross-tools

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/babyllama book

test: $(STAMP)
	$(PY) -m pytest --nbval -q tests book

lint: $(STAMP)
	$(VENV)/bin/ruff check lib tests bench book/*.py

bench: $(STAMP)
	$(PY) bench/bench_engines.py

# re-execute the chapters and rewrite the paired notebooks (the only target that does)
notebooks: $(STAMP)
	$(VENV)/bin/jupytext --sync book/[0-9]*.py
	for nb in book/[0-9]*.ipynb; do $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=900 $$nb || exit 1; done

c:
	$(MAKE) -C csrc

# optional, not part of setup: an aarch64 cross compiler and QEMU's user-mode emulators, with
# which tests/test_cross_arch.py runs the ARM SIMD paths (neon, sdot); without them it skips.
# Debian/Ubuntu; as root, or through sudo
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
cross-tools:
	$(SUDO) apt-get update
	$(SUDO) apt-get install -y gcc-aarch64-linux-gnu qemu-user

clean:
	rm -rf out build csrc/run csrc/*.so csrc/*.o
