PYTHON ?= python3

.PHONY: setup demo showcase test test-fast validate lint

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

# The main job: build the offline PolyMNIST (cached in data/), train HELVAE within its budget (on a GPU where
# torch sees one, else the CPU) and write runs/polymnist-helvae-cpu-<time>/ (checkpoint, metrics.csv, samples.png, report.md with coherence).
demo: setup
	$(PYTHON) -m applications.multimodal_vae train --preset polymnist-helvae-cpu \
		--set name=polymnist-helvae-cpu-$$(date +%Y%m%d-%H%M%S)

# The library's showcase: Hölder pools of every family for alpha from -inf to +inf.
showcase: setup
	$(PYTHON) -m opinionpool.demo

test: setup
	$(PYTHON) -m pytest -q tests

# the inner loop: everything but the tests marked slow (torch.compile, DDP, every preset and dataset from the
# command line, the fault injection); make test and .ci/run run them all
test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow" tests

validate: setup
	$(PYTHON) -m validation

lint:
	$(PYTHON) -m ruff check opinionpool tests benchmarks validation applications
