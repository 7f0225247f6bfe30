# The two commands of the README:
#   make up    — install into .venv and run the whole mesh on this machine
#   make test  — install what the tests need and run ruff, mypy and the full test suite
# Everything else here is what those two need.

PYTHON ?= python3
VENV := .venv
TRITON_VENV := .venv-triton
# tritonclient pins protobuf below 7 and registers the same `inference.*` names,
# so the stock client lives in a virtualenv of its own and tests call it in a subprocess.
TRITONCLIENT := tritonclient[grpc]==2.73.0

.PHONY: up test lint protos demo-models clean bench bench-peers

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	touch $@

$(TRITON_VENV)/.installed:
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet "$(TRITONCLIENT)"
	touch $@

# The bench's peers, each in a virtualenv of its own (their pins clash with ours and with each
# other), all serving the same ONNX file with onnxruntime; bench/peers/requirements-*.txt pin them.
# A peer whose install fails (no network) leaves no stamp, and the bench skips it with the reason.
PEERS := kserve mlserver pytriton
PEER_VENVS := $(PEERS:%=.venv-%)

.venv-%/.installed: bench/peers/requirements-%.txt
	rm -rf .venv-$*
	$(PYTHON) -m venv .venv-$*
	.venv-$*/bin/python -m pip install --quiet -r $<
	touch $@

# Each peer is best effort: `-` lets make go on when one cannot be installed here.
bench-peers:
	-$(MAKE) -k --no-print-directory $(PEER_VENVS:%=%/.installed)

up: $(VENV)/.installed
	$(VENV)/bin/edgecascade up

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: $(VENV)/.installed $(TRITON_VENV)/.installed lint
	TRITONCLIENT_PYTHON=$(abspath $(TRITON_VENV))/bin/python $(VENV)/bin/python -m pytest

protos: $(VENV)/.installed
	$(VENV)/bin/python -m protos.regenerate

demo-models: $(VENV)/.installed
	$(VENV)/bin/python -m examples.charlm.train --size all --out examples/models

clean:
	rm -rf $(VENV) $(TRITON_VENV) $(PEER_VENVS) .edgecascade .pytest_cache .mypy_cache .ruff_cache

bench: $(VENV)/.installed $(TRITON_VENV)/.installed bench-peers
	TRITONCLIENT_PYTHON=$(abspath $(TRITON_VENV))/bin/python $(VENV)/bin/python -m bench.run
