# Two commands a user needs: `make demo` (the whole pipeline on the default toy world) and `make test`.
# Both set up the virtualenv first; the setup is skipped when its stamp is newer than pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
VLLM_EXTRA ?= cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(VLLM_EXTRA)

.PHONY: setup demo compare long iterate test test-fast bench bench-peers bench-scale clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_env.sh
	VENV=$(VENV) PYTHON=$(PYTHON) VLLM_EXTRA=$(VLLM_EXTRA) bash scripts/setup_env.sh
	touch $(STAMP)

# The main job: the pipeline on the default toy world. Each stage reuses its outputs when they exist.
demo: setup
	$(PY) recipes/make_world.py
	$(PY) recipes/pretrain.py
	$(PY) recipes/train_rm.py
	$(PY) recipes/dr_grpo.py

# Post-training methods side by side on the demo's world, all judged on its ground truth (docs/wbc.md): WBC,
# Dr. GRPO with page credit (as published) and the demo's (token credit), 3 seeds each, then one table; and the
# reward model beside its random-initialization ablation (paper Table 1; the demo's reward model skips it).
compare: demo
	$(PY) recipes/train_rm.py scratch_ablation=true out_dir=runs/rm_ablation
	$(PY) recipes/wbc.py
	$(PY) recipes/dr_grpo.py credit=page out_dir=runs/dr_grpo_page
	$(PY) recipes/compare.py

# The longer Dr. GRPO run on the demo's world (recipes/configs/dr_grpo_long.yaml): two more reward models (the
# validator, a second ensemble member), then 3 seeds of up to 60 steps on the conservative ensemble, stopped early
# when the validator stops improving (measurements: docs/experiments/dr_grpo.md).
long: demo
	$(PY) recipes/train_rm.py seed=1 out_dir=runs/rm_seed1 scratch_ablation=false generated_users=0
	$(PY) recipes/train_rm.py seed=2 out_dir=runs/rm_seed2 scratch_ablation=false generated_users=0
	$(PY) recipes/dr_grpo.py --config recipes/configs/dr_grpo_long.yaml

# Iterated rounds on the demo's world (recipes/configs/iterate.yaml): each seed's RL policy serves new requests, the
# reward model is retrained on all logs and Dr. GRPO runs again from the served policy; 3 rounds, round 1 the demo's.
iterate: demo
	$(PY) recipes/iterate.py

test: setup
	$(PY) -m pytest tests -q

# The development tier: everything but the tests that start a vLLM engine, Ray / a verl run or a recipe subprocess
# (the pytest markers engine, ray and recipe in pyproject.toml); a couple of minutes here.
test-fast: setup
	$(PY) -m pytest tests -q -m "not engine and not ray and not recipe"

# Every benchmark, one after another (they must run alone: they time a 2-core machine), then the docs table.
bench: setup
	$(PY) benchmarks/world.py
	$(PY) recipes/make_world.py
	$(PY) benchmarks/pretrain.py
	$(PY) recipes/pretrain.py
	$(PY) benchmarks/rules.py
	$(PY) benchmarks/generation.py
	$(PY) benchmarks/hybrid.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/grpo_step.py
	$(PY) benchmarks/report.py

# The Dr. GRPO step against TRL's GRPOTrainer on the demo's checkpoint, reward model and shape (docs/benchmarks.md).
# Installs the `bench` extra (TRL) into the virtualenv first; TRL's own dependencies are already there.
bench-peers: demo
	$(PY) -m pip install --no-deps "trl==1.16.0"
	$(PY) benchmarks/peers.py

# The scale ladder (docs/scale.md): every stage at the toy and the medium preset (20,000 titles, 2,000,000
# impressions), bounded steps, costs per unit and peak memory -> runs/bench/scale.json. Most of its time goes to
# simulating the medium world (reused when runs/scale/medium/world exists).
bench-scale: setup
	$(PY) benchmarks/scale.py

clean:
	rm -rf runs
