# Quick start: `make demo` (end-to-end demo on toy data) and `make test`.
# Both install what they need into .venv once; later runs reuse it.
PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
# Rebuilt when the requirements change.
STAMP := $(VENV)/.itpn-d2-installed
# Installed only when the venv has no torch/torchvision; pre-install your own to keep it.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Detectron2's own tools/*.py (sha256-pinned), for tests/test_d2_interop.py. A target of its own
# so venvs made before it (stamp already there) get it too.
UPSTREAM_TOOLS := $(VENV)/detectron2-tools
UPSTREAM_TRAIN_NET := $(UPSTREAM_TOOLS)/lazyconfig_train_net.py

.PHONY: demo test venv

venv: $(STAMP) $(UPSTREAM_TRAIN_NET)

$(STAMP): setup.py tools/install_detectron2.py
	test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -c "import torch, torchvision" 2>/dev/null || $(VENV_PY) -m pip install $(TORCH_PINS)
	$(VENV_PY) -m pip install -e '.[dev,export]'
	$(VENV_PY) tools/install_detectron2.py
	touch $@

# Order-only on the stamp: needs the venv's pip, not a redo whenever the venv is refreshed.
$(UPSTREAM_TRAIN_NET): tools/install_detectron2.py | $(STAMP)
	$(VENV_PY) tools/install_detectron2.py --upstream-tools $(UPSTREAM_TOOLS)
	touch $@

# The end-to-end demo (tools/demo.py): 8-11 minutes on 2 CPU cores, output/demo/REPORT.md.
# A second run reuses finished stages; `make demo DEMO_ARGS=--force` redoes them.
demo: venv
	$(VENV_PY) tools/demo.py $(DEMO_ARGS)

test: venv
	$(VENV_PY) -m pytest -q tests
