# One command per step. `make test` and `make demo` set everything up from nothing.
#   make setup   - system packages (sshd, rsync, tmux; g++ and ninja for torch.compile and DeepSpeed's CPU Adam)
#                  and the .venv with every extra
#   make test    - the whole test suite on CPU (what CI runs through .ci/run)
#   make demo    - the whole chain on this machine: process -> train (tiny) -> refine
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; a range that 2.13.0 satisfies would otherwise pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup sysdeps venv test test-fast demo bench clean

setup: sysdeps venv

sysdeps:
	@if ! command -v sshd >/dev/null || ! command -v rsync >/dev/null || ! command -v tmux >/dev/null \
	    || ! command -v g++ >/dev/null || ! command -v ninja >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client rsync tmux g++ ninja-build; \
	  else echo "need openssh-server, rsync, tmux, g++ and ninja: sudo apt-get install openssh-server rsync tmux g++ ninja-build"; exit 1; fi; fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*; touch $@

test: setup
	$(BIN)/python -m pytest -q

# The whole chain on this machine with the tiny configs: process the bundled meshes, train the tiny
# model (detached job, followed to the end), then refine one mesh with the exported weights.
demo: setup
	$(BIN)/fab train --stack local --tiny --src examples/meshes
	$(BIN)/fab infer --stack local --tiny

bench: setup
	@ls bench/*.py

clean:
	rm -rf data outputs .pytest_cache
