# BAM — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bam demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests tools
	$(VENV)/bin/ruff format --check src tests tools
	$(VENV)/bin/mypy

test: $(STAMP) lint
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

# eBPF sensor object: vmlinux.h is dumped from this kernel's BTF with bpftool at build time
# (never committed), clang compiles src/bam/sensors/bpf/*.bpf.c. Skipped, with a note, where
# clang/bpftool/BTF are missing: BAM then falls back to tracefs or strace at run time.
BPF_OBJ := build/bpf/syscalls.bpf.o
$(BPF_OBJ): src/bam/sensors/bpf/syscalls.bpf.c src/bam/sensors/build.py | $(STAMP)
	$(PY) -m bam.sensors.build build/bpf || echo "note: eBPF sensor not built (see above)"
.PHONY: bpf
bpf: $(STAMP) $(BPF_OBJ)
install: $(BPF_OBJ)
demo test: $(BPF_OBJ)
