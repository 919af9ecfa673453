# `make demo` and `make test` do all set-up on first use: a .venv made with the
# standard library's venv and plain pip (torch resolves to the wheels on disk).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all venv clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(VPY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VPY) -m disparse_fx demo $(ARGS)

test: $(STAMP)
	$(VPY) -m pytest -q -n 2 --dist loadfile

test-all: $(STAMP)
	HYPOTHESIS_PROFILE=long $(VPY) -m pytest -q -n 2 --dist loadfile -m ""

clean:
	rm -rf $(VENV) build *.egg-info
