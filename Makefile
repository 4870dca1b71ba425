# Set-up and everyday commands. `make test` and `make serve` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test serve protos default-model clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[training,serving,annotate,dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

# Serves v12 (the default on CPUs: v9's two networks in int8 with 7-bit weights and fp32 stems, 1.6-1.9x v9's
# CPU throughput, the same scores on every CPU) and v9 (fp32, exact CAMs: `--version 9`; on a GPU, requests
# naming no version get v9, the fp32 source of v12).
serve: setup
	$(BIN)/cyborg serve --model-repository models --version-policy latest:2

# Retrain and re-export the embedded default model (v9: two CYBORG runs on the whole 256-px face, seeds 0 and 1,
# each fine-tuned 5 epochs under stronger changes taught by their average, averaged again; v12: the same in int8)
# from scratch on CPU, about 3.5 hours on 2 cores (deterministic for SEED, the validation split's seed);
# `python scripts/default_model.py --members 1 --version 6 --int8-version 0` is v6, one run, about 70 minutes.
# DATA holds faces/, sd21-faces/ and portraits/ (../shared/data/README.md); it prints its own running time.
DATA ?= ../shared/data
SEED ?= 0
default-model: setup
	$(BIN)/python scripts/default_model.py --data $(DATA) --seed $(SEED) --repository models

protos: setup
	$(BIN)/python -m serving.proto.generate

clean:
	rm -rf $(VENV) build *.egg-info
