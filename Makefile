# Two commands: `make demo` and `make test`. Both create .venv when it is missing and
# reinstall only when setup.cfg, setup.py or constraints.txt changed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): setup.cfg setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[dev]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import zoompipe.cli.main, torch, openslide, tiffslide"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/zoompipe synth $(DEMO_DIR) --n 1 --width 16384 --height 12288
	$(BIN)/zoompipe info $(DEMO_DIR)/synthetic_000.svs

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info
