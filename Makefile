# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/serve/local.yaml

# Ray's environment (no token auth, no usage stats, a patient proxy start-up check) is set by the programs the
# targets run, from lightray/ray_env.py: `lightray serve`, and testing/local_cluster.py for tests and benchmarks.

.PHONY: serve test test-fast bench train eval clean image image-cpu

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: pip then takes the local CPU wheel instead of pulling a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/lightray serve $(CONFIG)

# The playground's browser tests need Debian's chromium + chromium-driver: installed when missing.
test: $(VENV)/.installed
	bash testing/install_browser.sh
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The unit tier: no Ray cluster, no server, no browser (tests/conftest.py marks the tiers).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m unit $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_graph.py

train: $(VENV)/.installed   # from scratch; `$(PY) -m lightray.world.train --resume` continues a stopped run
	$(PY) -m lightray.world.train --out models/lightray-shapes

eval: $(VENV)/.installed
	$(PY) benchmarks/eval_model.py

# Container images (Dockerfile; README "Deploy on Kubernetes"): CUDA torch for the GPU nodes, CPU torch for the
# embedded model. Push with `docker push $(IMAGE):$(IMAGE_TAG)[-cpu]`.
IMAGE ?= ghcr.io/lightray/lightray
IMAGE_TAG ?= 0.1.0

image:
	docker build --build-arg VARIANT=gpu -t $(IMAGE):$(IMAGE_TAG) .

image-cpu:
	docker build --build-arg VARIANT=cpu -t $(IMAGE):$(IMAGE_TAG)-cpu .

clean:
	rm -rf $(VENV) .pytest_cache out runs
