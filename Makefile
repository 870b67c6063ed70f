# Quick start: `make demo` (end-to-end demo on toy data) and `make test`.
# Both install what they need into .venv once; later runs reuse it.
PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
# Rebuilt when the requirements change.
STAMP := $(VENV)/.itpn-d2-installed
# Installed only when the venv has no torch/torchvision; pre-install your own to keep it.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test venv

venv: $(STAMP)

$(STAMP): setup.py tools/install_detectron2.py
	test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -c "import torch, torchvision" 2>/dev/null || $(VENV_PY) -m pip install $(TORCH_PINS)
	$(VENV_PY) -m pip install -e '.[dev,export]'
	$(VENV_PY) tools/install_detectron2.py
	touch $@

# The end-to-end demo (tools/demo.py): ~11 minutes on 2 idle CPU cores, output/demo/REPORT.md.
# A second run reuses finished stages; `make demo DEMO_ARGS=--force` redoes them.
demo: venv
	$(VENV_PY) tools/demo.py $(DEMO_ARGS)

test: venv
	$(VENV_PY) -m pytest -q tests
