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

# Three synthetic slides (normal, atypical, malignant) through the zooming engine with the demo model.
demo: $(STAMP)
	$(BIN)/zoompipe synth $(DEMO_DIR) --n 3 --width 20480 --height 16384 --seed 7 --jobs 2
	$(BIN)/zoompipe predict $(DEMO_DIR)/slides/*.svs --out $(DEMO_DIR)/predictions --heatmap --profile
	@echo "heatmaps: $(DEMO_DIR)/predictions/*_panel.png"

# One test file per worker process, a worker per core (up to 4): the files share module fixtures
# (slides, runs) and the longest tests train on one thread. test_cluster.py runs alone afterwards:
# it kills Dask workers, and beside the other files a restarted one did not come back in 5 minutes.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest --numprocesses auto --maxprocesses 4 --dist loadfile \
		--ignore tests/test_cluster.py
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/test_cluster.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info
