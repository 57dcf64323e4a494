# The two commands of the README. Both set up everything on a fresh clone.
#   make demo   venv + install, fetch and export the default models (cached), start the
#               local cluster (real processes, ZeroMQ on loopback), run a few prompts.
#   make test   venv + install with test extras, run the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.cosine-installed

.PHONY: demo test install clean-engines

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 is a CPU build on local disk here; pinning it first keeps pip from
	# pulling a multi-GB CUDA build through transformers.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[export,test,bench]'
	# cosine's GGUF kernel (g++, ONNX Runtime headers from deb.debian.org); without it
	# exports fall back to MatMulNBits, so a failure here is reported, not fatal
	-$(BIN)/python -m cosine.workers.kernels
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m cosine.demo --config config.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

clean-engines:
	find engines -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
