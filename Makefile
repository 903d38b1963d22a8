# Two commands do all the set-up on a fresh machine:
#   make run    create .venv if missing, then run the default workflow (embedlens-mini)
#   make test   the same set-up, then the test suite
# Both are idempotent: the environment is rebuilt only when pyproject.toml or the lock changes.
# Every dependency is installed at the version in $(LOCK); `make lock` refreshes it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
STAMP  := $(VENV)/.installed
LOCK   := envs/lock-py311.txt
# A CPU wheel of this version is on the project machines; install it *first* so no
# other package pulls an unpinned torch (several GB of CUDA packages).
TORCH  ?= torch==2.13.0
# lmms-eval (the benchmark harness) goes in with --no-deps *after* the project: its own
# dependency list pulls a CUDA torch and a torchvision that breaks transformers' image
# processors here; the few packages it needs are the project's dependencies.
LMMS_EVAL := lmms-eval==0.7.3
CORES  ?= all
SNAKEMAKE_ARGS ?=

# Offline by design: nothing is fetched from a model hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: env lock browser run run-slurm test lint dry-run clean-results

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c $(LOCK) $(TORCH)
	$(VENV)/bin/python -m pip install -q -c $(LOCK) -e ".[test,cluster]"
	$(VENV)/bin/python -m pip install -q -c $(LOCK) --no-deps $(LMMS_EVAL)
	@touch $(STAMP)

# Re-resolve pyproject.toml in a new, empty venv (torch pinned first, as above) and write
# the exact versions to $(LOCK). Review the diff, run `make test`, commit both.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q $(TORCH)
	.lock-venv/bin/python -m pip install -q -e ".[test,cluster]"
	.lock-venv/bin/python -m pip install -q --no-deps $(LMMS_EVAL)
	{ sed -n '/^#/p' $(LOCK); .lock-venv/bin/python -m pip freeze --exclude-editable | \
	  grep -v '^embedlens' | sed -E 's/^torch==([0-9.]+)\+[a-z0-9]+$$/torch==\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .lock-venv
	@echo "$(LOCK) refreshed: git diff $(LOCK)"

env: $(STAMP)

run: env
	snakemake --cores $(CORES) --printshellcmds $(SNAKEMAKE_ARGS)

# On a Slurm login node: extraction shards become GPU jobs (profiles/slurm/config.yaml).
run-slurm: env
	snakemake --workflow-profile profiles/slurm $(SNAKEMAKE_ARGS)

dry-run: env
	snakemake -n $(SNAKEMAKE_ARGS)

lint: env
	snakemake --lint

# The report tests open the HTML in a real headless browser: Debian's chromium.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "Installing Debian's chromium for the browser tests"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else sudo -n sh -c 'apt-get update -qq && apt-get install -y -qq chromium' >/dev/null || \
	    echo "chromium is missing and could not be installed: browser tests will be skipped"; fi; }

test: env browser
	python -m pytest $(PYTEST_ARGS)

clean-results:
	rm -rf results logs .snakemake
