"""The target's features for training drafters: a resumable, checksummed cache, or computed online.

The target reads each training conversation once (chat template applied, truncated at max_len).
Token ids, the assistant-token mask, the target's final-norm features f_t (fp16) and its greedy
next token go to safetensors shards under
$TAPS_CACHE/features/<target>/<corpus>-<split>-n<N>-len<L>/ (`build_cache`). Shards appear
atomically, so an interrupted extraction resumes at the first missing one; meta.json records the
target's identity and each shard's size and SHA-1, so another target is refused and a truncated or
overwritten shard is rebuilt. `OnlineSet` (--features online) stores nothing: the target computes a
batch's features when training asks, rounded as the cache rounds them, so the losses are
bit-identical. Both serve train.py's loop through `FeatureSet.batch`.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from data import load_corpus
from model import TapsError, Transformer, target_identity
from extras.runtime import cache_dir
from extras.runtime import atomic_write, writing
from extras.distributed import SINGLE, World

HELDOUT_DOMAINS = ("math", "chat")
# the study's RQ2 mixtures read both domains' caches of a size: the first share * n conversations
# of each (mixed-small: the 35k + 35k analogue, mixed-large: 70k + 70k)
MIXES = {"mixed-small": 0.5, "mixed-large": 1.0}
SHARD_SIZE = 32      # conversations per feature shard (cached), or per unit of an epoch's shuffle


def logits(target, h):
    """The target's frozen LM head on features of any dtype, (..., H) -> (..., V) fp32: the
    greedy next token stored beside each feature, and train.py's p."""
    return target.head(h.to(target.embed_tokens.weight.dtype)).float()


def cache_root() -> Path:
    return cache_dir() / "features"


def encode_conversations(tokenizer, convs, max_len):
    """(ids, mask) per conversation through the chat template, truncated at max_len; conversations
    without an assistant token the drafter could predict (at position >= 2) are dropped."""
    out = []
    for conv in convs:
        ids, mask = tokenizer.encode_chat(conv)
        ids, mask = ids[:max_len], mask[:max_len]
        if any(mask[2:]):
            out.append((ids, mask))
    return out


@torch.inference_mode()
def target_features(target: Transformer, chunk: list, device) -> list:
    """The target over conversations `chunk` [ids] in one right-padded call: per conversation its
    final-norm features f (n, H) rounded to fp16 (what the cache stores) and its greedy next
    tokens (n,) int32, both on `device`. Right padding needs no attention mask: with causal
    attention the valid positions never see the padding after them."""
    dev = target.embed_tokens.weight.device
    T = max(map(len, chunk))
    tokens = torch.tensor([ids + [0] * (T - len(ids)) for ids in chunk], device=dev)
    _, h = target(tokens, last_only=True)                                # (B, T, H)
    return [(h[k, :len(ids)].to(device, torch.float16),
             logits(target, h[k, :len(ids)]).argmax(-1).to(device, torch.int32))
            for k, ids in enumerate(chunk)]


class FeatureSet:
    """A finished cache folder: shards of conversations, loaded one shard at a time. `sizes` are
    the conversations used of each shard: all of them, or fewer in a view made by `first`."""

    def __init__(self, folder: Path, meta: dict, sizes=None):
        self.folder, self.meta = folder, meta
        self.sizes = meta["shard_sizes"] if sizes is None else sizes
        # (i, conversations) of the shard read last: batches come shard by shard
        self.last = (None, None)

    def __len__(self):
        return len(self.sizes)

    def path(self, i) -> Path:
        return self.folder / f"{i:05d}.safetensors"

    def shard(self, i):
        """Shard i as a list of conversations {ids (n,), mask (n,), feats (n, H), next (n,)}."""
        t = read_shard(self.path(i))
        lengths = t.pop("lengths").tolist()
        parts = {k: v.split(lengths) for k, v in t.items()}
        return [{k: parts[k][c] for k in parts} for c in range(self.sizes[i])]

    def batch(self, i, idx: list) -> list:
        """Conversations idx of shard i (a training batch)."""
        if self.last[0] != i:
            self.last = (i, self.shard(i))
        return [self.last[1][c] for c in idx]

    def first(self, n: int) -> "FeatureSet":
        """A view of the first n conversations: a mixture's share of this cache (RQ2)."""
        from safetensors import safe_open
        sizes, tokens = [], 0
        for i, size in enumerate(self.sizes):
            take = min(size, n - sum(sizes))
            if take <= 0:
                break
            with safe_open(str(self.path(i)), framework="pt") as f:
                tokens += int(f.get_tensor("lengths")[:take].sum())
            sizes.append(take)
        meta = {**self.meta, "conversations": sum(sizes), "tokens": tokens}
        return FeatureSet(self.folder, meta, sizes)

    def target_tokens(self) -> torch.Tensor:
        """The target's greedy token x_{t+2} at every loss position (next token an assistant token),
        all conversations: what a drafter trained on it learns to propose. Reads no features."""
        from safetensors import safe_open
        out = []
        for i, size in enumerate(self.sizes):
            with safe_open(str(self.path(i)), framework="pt") as f:
                nxt, mask = f.get_tensor("next"), f.get_tensor("mask")
                lengths = f.get_tensor("lengths").tolist()
            pairs = list(zip(nxt.split(lengths), mask.split(lengths)))[:size]
            out += [n[1:-1][m[2:].bool()] for n, m in pairs]
        return torch.cat(out).long()


class OnlineSet(FeatureSet):
    """`--features online`: the same shards of conversations, but the target computes a batch's
    features when it is asked for them (as EAGLE-3 and SpecForge train) and nothing is stored, for
    targets whose cache would not fit on disk (hidden size 4096: ~740 GB for ShareGPT-68k). The
    features are rounded to fp16 as the cache's are, so both give bit-identical losses; the cost
    is a target forward per batch per epoch, and one pass more for a draft vocabulary."""

    def __init__(self, target: Transformer, examples: list, meta: dict, batch_size=1,
                 shard_size=SHARD_SIZE, sizes=None):
        super().__init__(Path(meta["name"]), meta, sizes)
        self.target, self.examples = target, examples
        self.batch_size, self.shard_size = batch_size, shard_size

    def path(self, i) -> str:
        return f"{self.meta['name']}, conversations {i * self.shard_size}.. (computed online)"

    def batch(self, i, idx: list) -> list:
        dev = self.target.embed_tokens.weight.device
        convs = [self.examples[i * self.shard_size + c] for c in idx]
        out = []
        # the cache's extraction batches, so its rounding
        for b in range(0, len(convs), self.batch_size):
            chunk = convs[b:b + self.batch_size]
            feats = target_features(self.target, [ids for ids, _ in chunk], dev)
            for (ids, mask), (f, nxt) in zip(chunk, feats):
                out.append({"ids": torch.tensor(ids, dtype=torch.int32, device=dev),
                            "mask": torch.tensor(mask, dtype=torch.uint8, device=dev),
                            "feats": f, "next": nxt})
        return out

    def shard(self, i):
        return self.batch(i, list(range(self.sizes[i])))

    def first(self, n: int) -> "OnlineSet":
        examples = self.examples[:n]
        meta = {**self.meta, "conversations": len(examples),
                "tokens": sum(len(ids) for ids, _ in examples)}
        sizes = [len(examples[i:i + self.shard_size])
                 for i in range(0, len(examples), self.shard_size)]
        return OnlineSet(self.target, examples, meta, self.batch_size, self.shard_size, sizes)

    def target_tokens(self) -> torch.Tensor:
        return torch.cat([c["next"][1:-1][c["mask"][2:].bool()] for i in range(len(self))
                          for c in self.shard(i)]).long().cpu()


def file_record(path: Path) -> dict:
    """Size and SHA-1 of a file, kept per shard in meta.json to find truncated or altered ones."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha1": digest.hexdigest()}


def read_shard(path: Path) -> dict:
    """A shard's tensors, refused with one line if unreadable or holding non-finite features."""
    from safetensors.torch import load_file
    try:
        t = load_file(str(path))
    except Exception as e:   # safetensors' own error types
        raise TapsError(f"{path}: unreadable feature shard ({e}); "
                        "delete it and rerun to rebuild it") from None
    if not torch.isfinite(t["feats"]).all():
        raise TapsError(f"{path}: feature shard holds non-finite values; "
                        "delete it and rerun to rebuild it")
    return t


def features_meta(target: Transformer, examples, corpus: dict, shard_size: int) -> dict:
    """What a set of features is: the target, the corpus, its conversations and their shards."""
    digest = hashlib.sha1(json.dumps(examples).encode()).hexdigest()[:16]
    return {"target": target_identity(target), **corpus, "conversations": len(examples),
            "tokens": sum(len(ids) for ids, _ in examples), "examples_sha1": digest,
            "shard_sizes": [len(examples[i:i + shard_size])
                            for i in range(0, len(examples), shard_size)]}


def build_cache(target: Transformer, examples, folder: Path, corpus: dict, shard_size=SHARD_SIZE,
                batch_size=1, desc="features", extract=True,
                world: Optional["World"] = None) -> FeatureSet:
    """Run the target over `examples` [(ids, mask)] in batches of `batch_size` (`target_features`)
    and store shards in `folder` (resumable); extract=False only reads a finished cache. Under
    torchrun rank r extracts shards r, r + size, ...; rank 0 checks old shards, writes meta.json."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    world = world or SINGLE
    n_shards = math.ceil(len(examples) / shard_size)
    meta = features_meta(target, examples, corpus, shard_size)
    meta_path = folder / "meta.json"
    missing = lambda k: TapsError(f"{folder}: {k} of {n_shards} {desc} shards are missing; "
                                  "build the caches of this size first: "
                                  "python train.py --features-only --size <the same size>")
    if not (extract or meta_path.exists()):
        raise missing(n_shards)
    cache_advice = "free space or set TAPS_CACHE to a writable directory; finished shards are kept"
    with writing(folder, cache_advice):
        folder.mkdir(parents=True, exist_ok=True)
    shards = {}                                   # finished shards: file name -> {"bytes", "sha1"}
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
            shards = old.pop("shards", {})
        except (ValueError, AttributeError):      # truncated: which target built them is unknown
            raise TapsError(f"{meta_path}: unreadable (truncated?), so the shards beside it "
                            f"cannot be trusted; delete {folder} to rebuild the cache") from None
        if old.get("target") != meta["target"]:
            raise TapsError(f"{folder}: feature cache was built for target "
                            f"{old.get('target')}, not {meta['target']}; "
                            "delete the folder or point TAPS_CACHE elsewhere")
        if old != meta:
            raise TapsError(f"{folder}: feature cache was built from other conversations "
                            "(tokenizer or corpus changed); delete the folder to rebuild it")

    def save_meta():
        with writing(folder, cache_advice):
            atomic_write(meta_path,
                         lambda p: p.write_text(json.dumps({**meta, "shards": shards}, indent=1)))

    paths = [folder / f"{i:05d}.safetensors" for i in range(n_shards)]
    for p in paths if world.main else []:         # a shard that is not what was written is rebuilt
        if not p.exists():
            continue
        record = file_record(p)
        if p.name not in shards:                  # a cache from before the records: keep what loads
            try:
                read_shard(p)
                shards[p.name] = record
            except TapsError:
                pass
        if shards.get(p.name) != record:
            print(f"{p}: changed since it was written (truncated or overwritten?); rebuilding it",
                  file=sys.stderr)
            p.unlink()
            shards.pop(p.name, None)
    if world.main:
        save_meta()
    world.barrier()
    lens = [len(ids) for ids, _ in examples]
    done = sum(sum(lens[i * shard_size:(i + 1) * shard_size])
               for i, p in enumerate(paths) if p.exists())
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if todo and not extract:
        raise missing(len(todo))
    if todo:
        t0 = time.perf_counter()
        bar = tqdm(total=meta["tokens"], initial=done, unit="tok", unit_scale=True, desc=desc,
                   smoothing=0.1, disable=not world.main)
        for i in todo[world.rank::world.size]:
            shard = examples[i * shard_size:(i + 1) * shard_size]
            feats, nexts = [], []
            for b in range(0, len(shard), batch_size):
                chunk = [ids for ids, _ in shard[b:b + batch_size]]
                for f, nxt in target_features(target, chunk, "cpu"):
                    feats.append(f)
                    nexts.append(nxt)
                bar.update(sum(map(len, chunk)))
            tensors = {"ids": torch.tensor([t for ids, _ in shard for t in ids], dtype=torch.int32),
                       "mask": torch.tensor([m for _, ms in shard for m in ms], dtype=torch.uint8),
                       "feats": torch.cat(feats), "next": torch.cat(nexts),
                       "lengths": torch.tensor([len(ids) for ids, _ in shard])}
            if not torch.isfinite(tensors["feats"]).all():
                raise TapsError(f"{desc}: target features overflow fp16; "
                                "this target is not supported by the cache")
            with writing(folder, cache_advice):
                atomic_write(paths[i], lambda p: save_file(tensors, str(p)))
            if world.main:
                shards[paths[i].name] = file_record(paths[i])
                save_meta()
        bar.close()
        world.barrier()                           # every rank's shards are written
        if world.main:
            shards.update({paths[i].name: file_record(paths[i])
                           for i in todo if paths[i].name not in shards})
            save_meta()
            rate = (meta["tokens"] - done) / (time.perf_counter() - t0)
            print(f"{desc}: {meta['tokens'] - done} tokens in {time.perf_counter() - t0:.0f} s "
                  f"({rate:.0f} tokens/s)")
    return FeatureSet(folder, meta)


def prepare_features(target, tokenizer, domain, split, n, max_len, data_dir=None, batch_size=1,
                     extract=True, online=False, world=None) -> FeatureSet:
    """Corpus -> chat template -> cached target features for one domain and split (online: computed
    when training asks for them, `OnlineSet`)."""
    convs = load_corpus(domain, n, split, data_dir=data_dir)
    examples = encode_conversations(tokenizer, convs, max_len)
    if not examples:
        raise TapsError(f"none of the {len(convs)} {domain} {split} conversations has an "
                        f"assistant token within the first {max_len} tokens; raise --max-len")
    ident = target_identity(target)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in ident["name"]) or "unnamed"
    # features of a bf16 (fp16) target are another cache than fp32's: they round differently
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(target.embed_tokens.weight.dtype)
    count = "all" if n is None else n
    folder = (cache_root() / f"{slug}-V{ident['vocab_size']}-H{ident['dim']}"
              / f"{domain}-{split}-n{count}-len{max_len}{'-' + dtype if dtype else ''}")
    corpus = {"domain": domain, "split": split, "n": n, "max_len": max_len,
              **({"dtype": dtype} if dtype else {})}
    if online:
        meta = {**features_meta(target, examples, corpus, SHARD_SIZE), "name": f"{domain} {split}"}
        return OnlineSet(target, examples, meta, batch_size)
    return build_cache(target, examples, folder, corpus, batch_size=batch_size,
                       desc=f"{domain} {split} features", extract=extract, world=world)


def training_sets(target, tokenizer, cfg, data_dir=None, extract_batch=None, online=False,
                  features_only=False, world=None):
    """train.py's data for a `TrainConfig`: (held-out sets per domain, the training sets, the sets
    that choose the draft vocabulary). A mixture takes the first share of both domains' caches of
    its size; with a draft vocabulary both domains' training sets are prepared, so every drafter
    of a size shares one vocabulary; features_only prepares everything of the size."""
    cuda = target.embed_tokens.weight.device.type == "cuda"
    batch = extract_batch or (8 if cuda else 1)
    mixture = cfg.domain in MIXES and not features_only
    prep = lambda d, split, n: prepare_features(target, tokenizer, d, split, n, cfg.max_len,
                                                data_dir, batch, extract=not mixture,
                                                online=online, world=world)
    heldout = {d: prep(d, "heldout", cfg.n_heldout) for d in HELDOUT_DOMAINS}
    every = cfg.draft_vocab or cfg.domain in MIXES or features_only
    need = HELDOUT_DOMAINS if every else (cfg.domain,)
    sets = {d: prep(d, "train", n) for d, n in cfg.corpus_sizes(need).items()}
    if mixture:
        train = [fs.first(round(MIXES[cfg.domain] * fs.meta["conversations"]))
                 for fs in sets.values()]
    else:
        train = [sets[cfg.domain]] if cfg.domain in sets else []
    return heldout, train, list(sets.values()) if cfg.draft_vocab else None
