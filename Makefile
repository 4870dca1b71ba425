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

serve: setup
	$(BIN)/cyborg serve --model-repository models

# Retrain and re-export the embedded default model (v6: one CYBORG run on the whole 256-px face, seed 1) from
# scratch on CPU, about 70 minutes on 2 cores (deterministic for SEED, the validation split's seed).
# DATA holds faces/, sd21-faces/ and portraits/ (../shared/data/README.md); it prints its own running time.
DATA ?= ../shared/data
SEED ?= 0
default-model: setup
	$(BIN)/python scripts/default_model.py --data $(DATA) --seed $(SEED) --repository models

protos: setup
	$(BIN)/python -m serving.proto.generate

clean:
	rm -rf $(VENV) build *.egg-info
