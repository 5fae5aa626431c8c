"""What is not the study's algorithm: file formats, plumbing and reports around the core files.

The core (model.py, taps.py, train.py, eval.py) never imports this package at module level; it
reaches in only inside the functions that need a piece of it.

  checkpoint.py  Hugging Face checkpoint directories; drafter files and their checks
  gguf.py        the embedded default's GGUF file: reader, conversion to an HF directory
  tokenizer.py   the tokenizer on tiktoken (HF byte-level BPE, Llama 3) and the chat template
  features.py    the target's features for training: a resumable, checksummed cache, or online
  distributed.py data parallel training under torchrun
  runtime.py     one-line errors, checks of flags, devices and destinations, atomic writes, the
                 machine a timing ran on, versions
  autotree.py    trees sized for the hardware (`--tree auto`, `AutoTree`) and `--dtype auto`
  speed.py       the speed table of `make bench` (`eval.py --speed`), HF transformers the peer
  bench.py       `model.py --bench`: decoding speed against the memory bound
  eagle.py       public EAGLE-1/2 checkpoint directories as drafters
  report.py      results files, the study's tables, bootstrap intervals and figures
"""
