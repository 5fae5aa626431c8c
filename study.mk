# The study's runs, included by the Makefile: `make study` (GPUs) and `make cpu-study` (2 cores).
.PHONY: study cpu-drafters cpu-eval cpu-study

# The full configuration on GPUs (an instruction: not yet run). TARGET: an HF checkpoint directory
# (e.g. Meta-Llama-3-8B-Instruct); NGPU ranks of torchrun per drafter, which must divide the batch of 8;
# features online (a cache of an 8B target's features would need ~740 GB); every benchmark item.
NGPU ?= 1
study: install
	@test -n "$(TARGET)" || { echo "usage: make study TARGET=<HF checkpoint directory> [NGPU=4]"; exit 2; }
	for b in eagle hass; do for d in math chat mixed-small mixed-large; do torchrun --standalone \
	  --nproc_per_node $(NGPU) train.py --domain $$d --backbone $$b --size full --features online \
	  --target $(TARGET) --device cuda --out checkpoints/full/$$b-$$d.safetensors \
	  $$(test -e checkpoints/full/$$b-$$d.state.pt && echo --resume) || exit 1; done; done
	for b in eagle hass; do $(PY) eval.py --target $(TARGET) --device cuda \
	  --compose single,average,route,route-entropy,merged,merged-dedup --equal-budget --lam-sweep 0,0.25,0.5,0.75,1 \
	  --temperature 0,1 --drafters checkpoints/full/$$b-math.safetensors checkpoints/full/$$b-chat.safetensors \
	  --json runs/study-$$b.json || exit 1; done

# The study at the CPU size on the embedded default (train.py's docstring): the shared feature caches,
# then the drafters, one after another (hours on 2 cores; every step resumes where it has a training
# state: rerun to continue).
CPU_DRAFTERS = eagle-math eagle-chat eagle-mixed-small eagle-mixed-large hass-math hass-chat
cpu-drafters: install
	$(PY) train.py --features-only --size cpu
	for v in $(CPU_DRAFTERS); do $(PY) train.py --backbone $${v%%-*} --domain $${v#*-} --size cpu \
	  --out checkpoints/cpu/$$v.safetensors $$(test -e checkpoints/cpu/$$v.state.pt && echo --resume) \
	  || exit 1; done

# The study's evaluation of them at the study's tree in fp32 (greedy output checked bit for bit), 64 new
# tokens, 20 items per benchmark at T = 0 and 10 at T = 1 (MT-Bench with both turns): one eval per
# (drafter set, temperature, benchmark), skipped when its results exist, so a cut study reruns only what
# is missing (`eval.py --report` joins a run's files; a set of several runs names each file after its run,
# a set of one run is given that name). EAGLE is evaluated before HASS is trained.
# Tables and figures: results/cpu/.
CPU = results/cpu
CPU_EVAL = --max-new-tokens 64 --tree study --dtype fp32
CPU_SETS = eagle mixed-small mixed-large
eagle_DRAFTERS = eagle-math eagle-chat
eagle_COMPOSE = single,average,route,route-entropy,merged,merged-dedup --equal-budget --lam-sweep 0.25,0.5,0.75
mixed_DRAFTERS = eagle-mixed-small eagle-mixed-large
hass_DRAFTERS = hass-math hass-chat
hass_COMPOSE = single,average,route,route-entropy,merged
cpu-eval:
	for set in $(CPU_SETS); do for t in 0 1; do for bench in gsm8k math_500 svamp mt_bench; do \
	  ls $(CPU)/$$set-$$bench-*-T$$t.json >/dev/null 2>&1 && continue; \
	  j=$(CPU)/$$set-$$bench.json; case $$set in eagle) c="$(eagle_COMPOSE)"; d="$(eagle_DRAFTERS)";; \
	    hass) c="$(hass_COMPOSE)"; d="$(hass_DRAFTERS)";; \
	    mixed-*) c=single; d=eagle-$$set; j=$(CPU)/$$set-$$bench-$$d-T$$t.json;; esac; \
	  $(PY) eval.py $(CPU_EVAL) --temperature $$t --limit $$( [ $$t = 0 ] && echo 20 || echo 10 ) --bench $$bench \
	    --compose $$c --drafters $$(for x in $$d; do echo checkpoints/cpu/$$x.safetensors; done) --json $$j || exit 1; \
	done; done; done

cpu-study: install
	$(PY) -m pip install -q matplotlib
	$(MAKE) cpu-drafters CPU_DRAFTERS="$(eagle_DRAFTERS) $(mixed_DRAFTERS)"
	$(MAKE) cpu-eval CPU_SETS="eagle mixed-small mixed-large"
	$(MAKE) cpu-drafters CPU_DRAFTERS="$(hass_DRAFTERS)"
	$(MAKE) cpu-eval CPU_SETS="hass"
	$(PY) eval.py --report $(CPU)/eagle-*.json $(CPU)/mixed-*.json --figures $(CPU)/figures-eagle > $(CPU)/eagle.md
	$(PY) eval.py --report $(CPU)/hass-*.json --figures $(CPU)/figures-hass > $(CPU)/hass.md
