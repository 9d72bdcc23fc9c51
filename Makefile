# Set-up and the two main commands. `make demo` and `make test` install what they need first.
# TORCH: the torch requirement installed into .venv when it has none (the CPU wheel by default;
# on a GPU machine pass e.g. TORCH='torch==2.11.0' or create .venv with your CUDA torch first).
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/diffattn demo --out outputs/demo

test: install
	$(VENV)/bin/pytest tests -n auto

bench: install
	$(VENV)/bin/diffattn bench kernels --out outputs/bench-kernels.json

clean:
	rm -rf outputs .pytest_cache
