# Two commands for a fresh machine (only python3, make and pip needed):
#   make train   set up .venv, then the 2-rank CPU rehearsal through run_llama_train.sh
#   make lint    ruff: the linter and the formatter's check (CI runs it before the tests)
#   make test    the test suite (what CI runs); the image checks in it need root, buildah,
#                podman, runc and debootstrap, and are skipped (with the reason) without them
# The image (daemonless; docker users run `docker build .`):
#   make image-base   CI's stand-in for the NGC base (docker/standin/build.sh)
#   make image        the training image on BASE_IMAGE (docker/build.sh)
#   make test-image   only the image checks (tests/image)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
LOCK := requirements.lock

.PHONY: setup train lint test test-image image-base image lock clean

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
	  if [ -f outputs/image-checks.txt ]; then echo "== image checks"; cat outputs/image-checks.txt; fi; exit $$status

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
