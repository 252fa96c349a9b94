# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-slow clean

$(BIN)/diffquant: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,peers,onnx,openvino]'
	touch $(BIN)/diffquant

install: $(BIN)/diffquant

# Headless Chromium renders the HTML report in the evaluation tests.
/usr/bin/chromium:
	(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium; report rendering tests will be skipped"

demo: install
	$(BIN)/diffquant demo --out runs/demo

test: install /usr/bin/chromium
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
