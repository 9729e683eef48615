# Two commands for a fresh machine (only python3, make and pip needed):
#   make train   set up .venv, then the 2-rank CPU rehearsal through run_llama_train.sh
#   make test    the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup train test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[local,test]'
	touch $(STAMP)

train: $(STAMP)
	NGPU=2 CONFIG_FILE=./train_configs/debug_model.toml ./run_llama_train.sh

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests -q

clean:
	rm -rf outputs .pytest_cache
