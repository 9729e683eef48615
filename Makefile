# Two commands for a fresh machine (only python3, make and pip needed):
#   make train   set up .venv, then the 2-rank CPU rehearsal through run_llama_train.sh
#   make lint    ruff: the linter and the formatter's check (CI runs it before the tests)
#   make test    the test suite (what CI runs); the image checks in it need root, buildah,
#                podman, runc and debootstrap, and are skipped (with the reason) without them.
#                Then the hub tests again on huggingface_hub 1.x (make test-hub1)
#   make test-hub1  the hub tests on huggingface_hub $(HUB1) instead of the lock's 2.x
# The image (daemonless; docker users run `docker build .`):
#   make image-base   CI's stand-in for the NGC base (docker/standin/build.sh)
#   make image        the training image on BASE_IMAGE (docker/build.sh)
#   make test-image   only the image checks (tests/image)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
LOCK := requirements.lock

.PHONY: setup train lint test test-hub1 test-image image-base image lock clean

# huggingface_hub 1.x (httpx) is supported beside the lock's 2.x (httpx2): NGC bases frozen before
# mid 2026 pin a click that no 2.x accepts. The hub tests run on both: the 1.x set is installed with
# --target into an overlay folder (only what differs from the venv: huggingface_hub, httpx, httpcore,
# and for an older 1.x the datasets, transformers, tokenizers, fsspec, dill that accept it) that goes first on
# PYTHONPATH. No second venv, no second torch.
HUB1 ?= 1.33.0
HUB1_DIR ?= $(VENV)/hub1-$(HUB1)
HUB_TESTS := tests/unit/test_hub.py tests/unit/launcher/test_stage.py tests/unit/inputs/test_tokenizer_files.py \
	tests/unit/training/test_data.py tests/unit/training/test_stream.py

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c $(LOCK) -e '.[local,test]'
	touch $(STAMP)

train: $(STAMP)
	NGPU=2 CONFIG_FILE=./train_configs/debug_model.toml ./run_llama_train.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The image checks' build times and sizes (outputs/image-checks.txt) are printed after the run.
test: $(STAMP)
	@status=0; $(VENV)/bin/python -m pytest tests -q || status=$$?; \
	  if [ -f outputs/image-checks.txt ]; then echo "== image checks"; cat outputs/image-checks.txt; fi; \
	  $(MAKE) --no-print-directory test-hub1 || status=$$?; exit $$status

$(HUB1_DIR)/.installed: $(STAMP)
	rm -rf $(HUB1_DIR) && mkdir -p $(HUB1_DIR)
	grep -v -i -E '^(huggingface[-_]hub|httpx2|httpcore2|datasets|transformers|tokenizers|fsspec|dill|multiprocess)==' $(LOCK) > $(HUB1_DIR)/constraints.txt
	$(VENV)/bin/python -m pip install --quiet --dry-run --report $(HUB1_DIR)/report.json \
	  -c $(HUB1_DIR)/constraints.txt "huggingface_hub==$(HUB1)" "datasets>=4.0,<6" transformers
	$(VENV)/bin/python -c "import json, sys; print('\n'.join(f\"{i['metadata']['name']}=={i['metadata']['version']}\" \
	  for i in json.load(open(sys.argv[1]))['install']))" $(HUB1_DIR)/report.json > $(HUB1_DIR)/overlay.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps --target $(HUB1_DIR) -r $(HUB1_DIR)/overlay.txt
	touch $@

test-hub1: $(HUB1_DIR)/.installed
	@echo "== hub tests on huggingface_hub $(HUB1): $$(tr '\n' ' ' < $(HUB1_DIR)/overlay.txt)"
	TTR_EXPECT_HUB=$(HUB1) PYTHONPATH=$(abspath $(HUB1_DIR)):$(CURDIR) $(VENV)/bin/python -m pytest -q \
	  -p no:cacheprovider $(HUB_TESTS)

test-image: $(STAMP)
	@status=0; $(VENV)/bin/python -m pytest tests/image -q || status=$$?; \
	  if [ -f outputs/image-checks.txt ]; then echo "== image checks"; cat outputs/image-checks.txt; fi; exit $$status

image-base:
	docker/standin/build.sh

image:
	docker/build.sh

# The venv's exact versions, as requirements.lock (see its header).
lock: $(STAMP)
	{ sed -n '/^#/p' $(LOCK); $(VENV)/bin/python -m pip freeze --exclude-editable \
	  | grep -v -E '^(pip|setuptools|wheel)==' | sed -E 's/^(torch==[^+]*)\+cpu$$/\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

clean:
	rm -rf outputs .pytest_cache
