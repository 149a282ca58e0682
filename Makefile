# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Offline raw datasets (MNIST, Fashion-MNIST, Omniglot); unset -> tfds downloads them.
RAW_DIR ?= $(firstword $(wildcard ../shared/data))
export METACF_RAW_DIR ?= $(if $(RAW_DIR),$(abspath $(RAW_DIR)),)

.PHONY: demo distill forgetting-predict omniglot baselines paradigms text-paradigms lwf prevent meta-continual test docs doctest bench gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,experiments,docs]'
	touch $(STAMP)

# One install: the [docs] extra (Sphinx, furo, myst-parser, offline MathJax) too, so that the
# tests of the docs extensions run in `make test` rather than being skipped.
DOCS_STAMP := $(STAMP)

demo: $(STAMP)  ## the main job: catastrophic forgetting and its cures on Split MNIST
	$(PY) -m experiments.forgetting.main --config=default --workdir=runs/forgetting

distill: $(STAMP)  ## Hinton et al. 2015 distillation on MNIST
	$(PY) -m experiments.distill_mnist.main --config=default --workdir=runs/distill_mnist

forgetting-predict: $(STAMP)  ## NTK-predicted vs measured forgetting on MNIST task pairs
	$(PY) -m experiments.predict_forgetting.main --config=default --workdir=runs/predict_forgetting

omniglot: $(STAMP)  ## Finn et al. 2017 MAML on Omniglot (GPU; CPU: OMNIGLOT_FLAGS="--settings=5way1shot --time_budget_s=1500")
	$(PY) -m experiments.maml_omniglot.main --config=default --workdir=runs/maml_omniglot $(OMNIGLOT_FLAGS)

baselines: $(STAMP)  ## MAML, FOMAML, Reptile, iMAML, ProtoNets, ANIL, MAML++ on 5-way Omniglot, equal wall-clock budget (CPU: ~45 min; GPU: the papers' protocols)
	$(PY) -m experiments.meta_baselines.main --config=default --workdir=runs/meta_baselines

paradigms: $(STAMP)  ## fine-tuning paradigms (probe, full, LoRA, prompts, ...) vs forgetting, MNIST -> Fashion-MNIST
	$(PY) -m experiments.finetune_paradigms.main --config=default --workdir=runs/finetune_paradigms

text-paradigms: $(STAMP)  ## T5/BART/BERT-style pre-training on Tiny Shakespeare, then every paradigm on speaker attribution (~45 min CPU)
	$(PY) -m experiments.text_paradigms.main --config=default --workdir=runs/text_paradigms

lwf: $(STAMP)  ## LwF retention vs how much B's inputs observe A's Jacobian directions
	$(PY) -m experiments.lwf_observability.main --config=default --workdir=runs/lwf_observability

prevent: $(STAMP)  ## OGD, PCA-OGD, GPM, A-GEM, EWC, ER on Permuted/Rotated MNIST; forgetting predicted under projection
	$(PY) -m experiments.prevent_forgetting.main --config=default --workdir=runs/prevent_forgetting

meta-continual: $(STAMP)  ## meta-learned inits vs task-subspace orthogonality and forgetting (a); online continual learning (b)
	$(PY) -m experiments.meta_continual.main --config=default --workdir=runs/meta_continual

test: $(STAMP)  ## the test suite, on 2 processes (pytest-xdist; one class per process at a time)
	$(PY) -m pytest -q -n 2 --dist loadscope

docs: $(DOCS_STAMP)  ## HTML docs into docs/_build/html (offline; warnings are errors)
	$(VENV)/bin/sphinx-build -E -W --keep-going -q -b html -j auto docs docs/_build/html
	$(PY) docs/ext/check_build.py docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

doctest: $(DOCS_STAMP)  ## runs the >>> examples of the docs pages and of the docstrings they render
	$(VENV)/bin/sphinx-build -E -W --keep-going -q -b doctest docs docs/_build/doctest

bench: $(STAMP)  ## microbenchmarks; JSON lines go to benchmarks/results/
	$(PY) -m benchmarks.bench_distill
	$(PY) -m benchmarks.bench_replay
	$(PY) -m benchmarks.bench_jacobian
	$(PY) -m benchmarks.bench_protect
	$(PY) -m benchmarks.bench_noise
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m benchmarks.bench_cl_baselines
	$(PY) -m benchmarks.bench_maml
	$(PY) -m benchmarks.bench_meta_family
	$(PY) -m benchmarks.bench_meta_continual

# No venv step: a lent GPU has jax but no internet (benchmarks/gpu.sh uses .venv if present, else python3).
# Prepare the data here first (`bash benchmarks/gpu.sh --prepare`) and carry .gpu_data; GPU_FLAGS=--tiny on a CPU.
gpu:  ## every benchmark's GPU configuration, Omniglot MAML, meta-learning comparison, paradigms, prevent-forgetting, < 10 min; one JSON
	bash benchmarks/gpu.sh $(GPU_FLAGS)

clean:
	rm -rf $(VENV) runs .pytest_cache docs/_build docs/api/_autosummary
