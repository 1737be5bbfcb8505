# The two commands of the README. Both install into .venv at the repository root first (idempotent).
SHELL := /bin/bash
CORES ?= all

.PHONY: install demo test report clean

install:
	bash scripts/install.sh

demo: install  ## install, run the whole DAG on config.yaml, then build the HTML report
	.venv/bin/snakemake --cores $(CORES)
	.venv/bin/snakemake --cores $(CORES) --report results/demo/report.html

test: install  ## install, then run the test suite (it starts and stops its own SLURM cluster)
	bash scripts/install_slurm.sh
	bash scripts/run_tests.sh

clean:
	rm -rf results .snakemake
