"""What is not the study's algorithm: file formats, plumbing and reports around the core files.

The core (model.py, taps.py, train.py, eval.py) never imports this package at module level; it
reaches in only inside the functions that need a piece of it: converting the embedded default
target, reading a checkpoint's tokenizer, train.py's features, and the CLIs' --tree auto, --dtype auto, --speed and tables.

  gguf.py      the embedded default's GGUF file: reader, conversion to a Hugging Face directory
  tokenizer.py the tokenizer on tiktoken (HF byte-level BPE, Llama 3) and the chat template
  features.py  the target's features for training: a resumable, checksummed cache, or online
  autotree.py  trees sized for the hardware (`--tree auto`, `AutoTree`) and `--dtype auto`
  speed.py     the speed table of `make bench` (`eval.py --speed`), with HF transformers as the peer
  report.py    the study's tables, bootstrap intervals and figures from eval.py's result files
  eagle.py     public EAGLE-1/2 checkpoint directories as drafters
  bench.py     `model.py --bench`: decoding speed against the memory bound, random weights of a named shape
"""
