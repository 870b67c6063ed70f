# Quick start: `make demo` (toy data + a short run) and `make test`.
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
	$(VENV_PY) -m pip install -e '.[dev]'
	$(VENV_PY) tools/install_detectron2.py
	touch $@

demo: venv
	$(VENV_PY) tools/make_toy_dataset.py
	if [ -f pretrain/main.py ]; then \
		$(VENV_PY) pretrain/main.py --model itpn_nano --max_steps 5; \
	else \
		$(VENV_PY) tools/make_toy_dataset.py --check; \
	fi

test: venv
	$(VENV_PY) -m pytest -q tests
