# `make demo`: set up .venv (CPU torch where there is no GPU) and run the SFT demo on the
#              built-in tiny model and bundled sample chats (~2 minutes on 2 CPU cores).
# `make test`: set up .venv and run the test suite.
PY := .venv/bin/python
DEMO_LOG ?= runs/demo

.PHONY: setup demo test lint clean-demo

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m recipes.sft_loop log_path=$(DEMO_LOG) dcp_save_interval=25 \
		output_model_id=sft-demo infra.storage_root=$(DEMO_LOG)/store

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check training recipes scripts tests benchmarks

clean-demo:
	rm -rf $(DEMO_LOG)
