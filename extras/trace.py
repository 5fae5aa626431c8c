"""See speculative decoding happen: a trace of every verifier call, as text, JSON lines or a page.

`Trace` is what `taps.generate(..., trace=Trace())` fills, one `Call` per verifier call: the tree
the target verified (tokens, parents, depth, the drafter of each node, cumulative log q and q),
the routing decision of a composition (each tree's mean confidence and entropy), every acceptance
test, the final draw, the accepted path and the tokens emitted, and the draft / verify time. It
records what the verifier *used*: `taps.verify_tree` and `taps.verify_chain` hand it r(s) as they
test it and the vector they draw from (`taps.VerifyTrace`), and the uniform each test drew is the
random source's own (`TorchRandom.u`). Nothing is recomputed, so it cannot disagree with what
happened; the target's p(s) of a tree's test is r(s) times the mass the earlier rejections at
that node left (r starts as p, and each rejection keeps 1 - r(s) of it).

It also records the nodes each drafter drafted that `prune` dropped (`taps.Tree.pool`, what a
pruned tree was cut from), as `Pruned` nodes numbered on from the verified tree's: shown dimmed
(`✂ ... pruned`), drawn grey and dashed, listed in the JSON. A pool node is matched to the
verified tree by its drafter and token path, which maps it through any composition (a routed
tree is verified as it is, a merged one offset, a de-duplicated one united); a dropped node's
parent is the verified node it hangs from, or another dropped node. Only the verified trees'
pools count: a tree routing passed over is summarised in the routing, not listed node by node.

Three views of one trace:
* `render_text` (`taps.py --show`): each call as an indented tree, the accepted path expanded,
  rejected children with their r(s), wide nodes folded to a few children and a count of the rest.
* `record` / `save` (`--trace FILE.jsonl`, also `eval.py --trace`): one JSON object per call.
* `render_html` (`--trace-html FILE.html`): one self-contained page, an inline SVG per call.

JSON lines, schema 3: {"schema": 3, "generation": g (0, 1, ... per `generate` run), "call": i
(from 0), "meta": {...what the caller set, e.g. prompt, run, turn}, "tree": {"tokens", "text",
"parents" (the root's null), "depth", "origin" (the drafters of each node: [d], or several for a
united node; the root's []), "logq", "q" (null where unknown: a node under another drafter's),
"first" (the trie node a merged tree's copy is verified as), "status" (root / accepted /
rejected / untried)}, "routing": null or {"compose", "trees": [{"drafter", "nodes",
"confidence", "entropy"}], "chosen" (the drafters whose tree was verified: [d], or all of them
for a merged tree, as `taps.Stats.routed`)},
"tests": [{"node", "child", "token", "r", "p", "u", "accepted"}], "draw": {"node", "token",
"text", "kind" (bonus or correction), "prob" (in the distribution drawn from), "residual_mass"
(of p left by the node's rejections; a chain's: of max(0, p - q))}, "path", "emitted",
"emitted_text", "draft_s", "verify_s", "tau" (of the generation so far), "pruned": [{"id"
(from len(tokens) on), "token", "text", "parent" (a tree node, or an earlier pruned id), "depth",
"origin", "logq", "q"}] (new in schema 3)}. Numbers that are not finite are null.
"""
from __future__ import annotations

import contextlib
import html
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import taps
from model import TapsError, mean
from extras.runtime import atomic_write, check_writable, writing

SCHEMA = 3


def _value(v):
    """A probability as handed over: a Python number now (a tensor element would change with r);
    exact types (Fraction) stay exact."""
    return v.item() if hasattr(v, "item") else v


def _num(v) -> Optional[float]:
    """JSON-safe: a float, or None for nothing, NaN or an infinity."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


# ----------------------------------------------------------------------------- recording

@dataclass
class Test:
    """One acceptance test: `child` (a first copy in the trie) of `node`, accepted with prob. r."""
    node: int
    child: int
    token: int
    r: object                 # the acceptance probability as used (float, or exact Fraction)
    p: object                 # the target's p(token) after node
    u: Optional[float]        # the uniform drawn (TorchRandom), None when the source hides it
    accepted: bool


@dataclass
class Draw:
    """The verifier's own token: a bonus drawn from p, or a correction from the residual."""
    node: int
    token: int
    kind: str                 # "bonus" (no child tested) or "correction" (all tested rejected)
    prob: object              # its probability in the distribution drawn from
    residual_mass: object     # what the rejections left (1 for a bonus)
    text: Optional[str] = None


@dataclass
class Pruned:
    """A node a drafter drafted and `prune` dropped, numbered on from the verified tree's nodes:
    its parent is a verified node or an earlier pruned one."""
    id: int
    token: int
    parent: int
    depth: int
    origin: frozenset[int]
    logq: float
    q: float                  # given its parent, in the pool it was drafted in
    text: Optional[str] = None


def _pools(tree: taps.Tree):
    """What a tree was pruned from, and what that was pruned from, ..."""
    while tree.pool is not None:
        tree = tree.pool
        yield tree


def pruned(tree: taps.Tree, drafted: dict[int, taps.Tree],
           decode: Optional[Callable[[int], str]] = None) -> list[Pruned]:
    """The nodes drafted for a call and dropped by `prune`: of each composed tree in `drafted`
    (drafter -> its tree), and of the verified tree's own pools where it is none of them (`AutoTree`
    prunes a merged tree again). A pool node whose drafter and token path the verified tree (or an
    earlier pool) holds is that node; the others are new, numbered in pool order."""
    known, out = {}, []      # (drafter, token path) -> node id

    def add(t: taps.Tree, origin: Optional[frozenset[int]] = None):
        paths, ids = [()], [0]
        for i in range(1, len(t)):
            paths.append(paths[t.parents[i]] + (t.tokens[i],))
            o = t.origin[i] if origin is None else origin   # a pool is drafted before `tag`
            node = i if t is tree else next((known[d, paths[i]] for d in o
                                             if (d, paths[i]) in known), None)
            if node is None:
                node = len(tree) + len(out)
                out.append(Pruned(node, t.tokens[i], ids[t.parents[i]], len(paths[i]), o,
                                  t.logq[i], math.exp(t.logq[i] - t.logq[t.parents[i]]),
                                  decode and decode(t.tokens[i])))
            ids.append(node)
            for d in o:
                known.setdefault((d, paths[i]), node)

    add(tree)
    if all(t is not tree for t in drafted.values()):
        for pool in _pools(tree):
            add(pool)
    for d, t in drafted.items():
        for pool in _pools(t):
            add(pool, frozenset({d}))
    return out


@dataclass
class Routing:
    """A composition's decision: each drafter's tree summarised, and whose the composition chose:
    one drafter's (routed), or all of theirs (merged). `taps.Stats.routed` counts instead the
    drafters whose nodes the verified tree holds, which an `AutoTree` prune can narrow."""
    compose: str
    trees: list[dict]         # per drafter: nodes, mean confidence exp(logq), mean entropy
    chosen: frozenset[int]


@dataclass
class Call:
    """One verifier call as it happened."""
    generation: int
    index: int
    meta: dict
    tree: taps.Tree
    text: Optional[list[str]]    # each node's token as text (None: no decoder given)
    routing: Optional[Routing]
    tests: list[Test]
    draw: Draw
    path: list[int]
    emitted: list[int]           # the call's tokens that were kept (a stop token ends early)
    emitted_text: Optional[str]
    draft_s: float
    verify_s: float
    tau: float                   # new tokens / calls of this generation, up to this call
    pruned: list[Pruned] = field(default_factory=list)   # ids from len(tree) on

    @property
    def first(self) -> tuple[int, ...]:   # a merged tree's copies are verified as one
        return self.tree.first

    @property
    def origin(self) -> tuple[frozenset[int], ...]:
        return self.tree.origin

    def q(self) -> list[Optional[float]]:
        """Each node's draft probability given its parent, where one drafter scored both."""
        t, o = self.tree, self.origin
        return [None] + [math.exp(t.logq[i] - t.logq[t.parents[i]])
                         if len(o[i]) == 1 and (t.parents[i] == 0 or o[t.parents[i]] == o[i])
                         else None for i in range(1, len(t))]

    def tested(self) -> dict[int, Test]:
        return {t.child: t for t in self.tests}

    def status(self) -> list[str]:
        """root, accepted, rejected or untried, of a node's first copy."""
        on_path = {self.first[i] for i in self.path}
        tested = self.tested()
        out = ["root"]
        for i in range(1, len(self.tree)):
            f = self.first[i]
            out.append("accepted" if f in on_path else "rejected" if f in tested else "untried")
        return out

    def children(self) -> list[list[int]]:
        """Each node's children, the pruned nodes' included (ids from len(tree) on)."""
        kids = [list(k) for k in self.tree.children] + [[] for _ in self.pruned]
        for x in self.pruned:
            kids[x.parent].append(x.id)
        return kids

    def accepted_from(self) -> list[frozenset[int]]:
        """The drafters of each accepted node's first copy, where its test was made (several: a
        united node of merged-dedup), as `taps.Stats.accepted_from` counts the first."""
        return [self.origin[self.first[i]] for i in self.path[1:]]


class Trace:
    """A recorder `taps.generate` fills (trace=...): `watch` starts a generation, the verifiers
    report `test` and `draw` (`taps.VerifyTrace`), and `call` closes each verifier call. Calls are
    kept in `calls`, or handed to sink(record) as JSON objects when a sink is given (a long
    evaluation streams them to a file). decode(token id) -> text labels the tokens; `meta` is
    copied into every call (what the caller wants to find the call by)."""

    def __init__(self, decode: Optional[Callable[[int], str]] = None,
                 sink: Optional[Callable[[dict], None]] = None):
        self.decode, self.sink = decode, sink
        self.calls: list[Call] = []
        self.meta: dict = {}
        self.generation, self.rng = -1, None
        self._reset()

    def _reset(self):
        self._tests, self._draw, self._routing, self._drafted = [], None, None, {}
        self._left: dict[int, object] = {}   # node -> mass of p its rejections left

    def watch(self, compose=None, rng=None):
        """A new generation: its random source (read for the uniforms) and its composition, which
        is returned wrapped so that each call's input trees are summarised."""
        self.generation += 1
        self.rng, self._calls, self._emitted = rng, 0, 0
        self._reset()
        if compose is None:
            return None
        name = next((k for k, f in taps.COMPOSE.items() if f is compose),
                    getattr(compose, "__name__", "custom"))

        def composed(trees):
            tree = compose(trees)
            chosen = next((frozenset({i}) for i, t in enumerate(trees) if t is tree),  # routed
                          frozenset(range(len(trees))))                                # merged
            if len(trees) > 1:
                self._routing = Routing(name, [
                    {"drafter": i, "nodes": len(t) - 1, "confidence": mean(t.confidence[1:]),
                     "entropy": mean(t.entropy[1:])} for i, t in enumerate(trees)], chosen)
            self._drafted = {i: trees[i] for i in sorted(chosen)}   # their pools: `pruned`
            return tree
        return composed

    def test(self, node, child, token, r, accepted, p=None):
        r, left = _value(r), self._left.get(node, 1)
        p = r * left if p is None else _value(p)   # r is p renormalised after the rejections
        self._tests.append(Test(node, child, token, r, p, getattr(self.rng, "u", None),
                                bool(accepted)))
        if not accepted:
            self._left[node] = left * (1 - r)

    def draw(self, node, token, r, residual_mass=None):
        # a draw follows tests at its node only when they all failed: each left its mass there
        rejected = node in self._left
        mass = self._left.get(node, 1) if residual_mass is None else _value(residual_mass)
        self._draw = Draw(node, int(token), "correction" if rejected else "bonus",
                          _value(r[token] / r.sum()), mass, self.decode and self.decode(token))

    def call(self, tree: taps.Tree, path: list[int], emitted: list[int], draft_s: float = 0.0,
             verify_s: float = 0.0):
        """Close a verifier call: the tree verified, its accepted path, the tokens kept."""
        self._calls += 1
        self._emitted += len(emitted)
        text = [self.decode(t) for t in tree.tokens] if self.decode else None
        c = Call(self.generation, self._calls - 1, dict(self.meta), tree, text,
                 self._routing, self._tests, self._draw, list(path), list(emitted),
                 self.decode and "".join(map(self.decode, emitted)), draft_s, verify_s,
                 self._emitted / self._calls, pruned(tree, self._drafted, self.decode))
        self._reset()
        if self.sink is not None:
            self.sink(record(c))
        else:
            self.calls.append(c)


def record(c: Call) -> dict:
    """A call as one JSON object (schema: the module docstring)."""
    t, d = c.tree, c.draw
    return {
        "schema": SCHEMA, "generation": c.generation, "call": c.index, "meta": c.meta,
        "tree": {"tokens": list(t.tokens), "text": c.text, "parents": list(t.parents),
                 "depth": list(t.depths), "origin": [sorted(o) for o in c.origin],
                 "logq": [_num(x) for x in t.logq],
                 "q": [_num(x) for x in c.q()], "first": list(c.first), "status": c.status()},
        "routing": None if c.routing is None else {
            "compose": c.routing.compose, "chosen": sorted(c.routing.chosen),
            "trees": [{k: _num(v) if isinstance(v, float) else v for k, v in s.items()}
                      for s in c.routing.trees]},
        "tests": [{"node": x.node, "child": x.child, "token": x.token, "r": _num(x.r),
                   "p": _num(x.p), "u": _num(x.u), "accepted": x.accepted} for x in c.tests],
        "draw": {"node": d.node, "token": d.token, "text": d.text,
                 "kind": d.kind, "prob": _num(d.prob), "residual_mass": _num(d.residual_mass)},
        "path": c.path, "emitted": c.emitted, "emitted_text": c.emitted_text,
        "draft_s": c.draft_s, "verify_s": c.verify_s, "tau": c.tau,
        "pruned": [{"id": x.id, "token": x.token, "text": x.text, "parent": x.parent,
                    "depth": x.depth, "origin": sorted(x.origin), "logq": _num(x.logq),
                    "q": _num(x.q)} for x in c.pruned],
    }


# ----------------------------------------------------------------------------- text (--show)

_XML_BAD = re.compile("[\ud800-\udfff\ufffe\uffff]")


def label(token: int, text: Optional[str]) -> str:
    """A token for display: its text quoted with escapes (a newline shows as \\n), else its id."""
    if text is None:
        return f"[{token}]"
    return _XML_BAD.sub("\ufffd", json.dumps(text, ensure_ascii=False))


def _g(x) -> str:
    return "–" if x is None else f"{float(x):.3g}"


ANSI = {"accepted": "\033[32m", "rejected": "\033[31m", "dim": "\033[2m", "bold": "\033[1m"}
MARK = {"root": "", "accepted": "✓", "rejected": "✗", "untried": "·", "pruned": "✂"}
RANK = {"accepted": 0, "rejected": 1, "untried": 2, "pruned": 3}


def summary(c: Call) -> str:
    """One line: the size, what was accepted and from whom, the call's tokens, tau, the times."""
    n, origins = len(c.tree) - 1, sorted(set(c.origin[1:]), key=sorted)
    by = ""
    if len(origins) > 1:
        by = " (" + ", ".join(f"{_who(o)} {c.origin[1:].count(o)}" for o in origins) + ")"
    src = {_who(o) for o in c.accepted_from()}
    acc = f"{len(c.path) - 1} accepted" + (f" from {'/'.join(sorted(src))}" if src else "")
    shown = f" {label(0, c.emitted_text)}" if c.emitted_text is not None else ""
    what = "a plain step" if n == 0 else f"{n} nodes{by}, {acc}, + {c.draw.kind}"
    k = len(c.emitted)
    return (f"call {c.index + 1}: {what} -> {k} token{'s' * (k != 1)}{shown}; tau {c.tau:.2f} so "
            f"far; draft {1e3 * c.draft_s:.1f} ms, verify {1e3 * c.verify_s:.1f} ms")


def routing(r: Routing) -> str:
    """A composition's decision: each drafter's tree (size, mean confidence, entropy), the pick."""
    trees = " · ".join(f"d{s['drafter']}: {s['nodes']} nodes, confidence {_g(s['confidence'])}, "
                       f"entropy {_g(s['entropy'])}" for s in r.trees)
    chosen = "merged" if len(r.chosen) > 1 else f"verified {_who(r.chosen)}"
    return f"{r.compose}: {trees} -> {chosen}"


def _who(origin: frozenset[int]) -> str:
    """Who drafted a node: d0, d1 ..., several (a united node), or no one (the root)."""
    return "root" if not origin else "several" if len(origin) > 1 else f"d{min(origin)}"


def render_call(c: Call, width: int = 4, colour: bool = False) -> str:
    """A call as an indented tree. Only the accepted path is expanded; every node shows its
    status mark, token, node id and q, tested ones p, r and the uniform u; at most `width`
    children per node (accepted first, then rejected, then the untried with the best scores), the
    rest counted; the nodes `prune` dropped last, dimmed. Merged trees name each node's drafter
    (d0, d1; several: a united node)."""
    paint = (lambda kind, s: f"{ANSI[kind]}{s}\033[0m") if colour else (lambda kind, s: s)
    t, status, q, tested, kids = c.tree, c.status(), c.q(), c.tested(), c.children()
    cut = {x.id: x for x in c.pruned}
    status += ["pruned"] * len(cut)
    logq = [*t.logq, *(x.logq for x in c.pruned)]
    sizes = [1] * len(kids)
    for i in range(len(kids) - 1, 0, -1):   # a parent precedes its children, pruned ones too
        sizes[cut[i].parent if i in cut else t.parents[i]] += sizes[i]
    merged = len(set(c.origin[1:])) > 1
    lines = [paint("bold", summary(c))]
    if c.routing is not None:
        lines.append("  " + routing(c.routing))

    def node_line(i: int) -> str:
        s = status[i]
        if i in cut:
            x = cut[i]
            who = f"  {_who(x.origin)}" if merged else ""
            below = f"  (+{sizes[i] - 1} below)" if sizes[i] > 1 else ""
            return paint("dim", f"{MARK[s]} {label(x.token, x.text)} #{i}{who}  q {_g(x.q)}  "
                                f"pruned{below}")
        text = label(t.tokens[i], c.text[i] if c.text else None)
        parts = [f"{MARK[s]} {text} #{i}".strip()]
        if i == 0:
            parts.append("(root)")
        elif c.first[i] != i:
            parts.append(f"= #{c.first[i]}")
        if merged and i:
            parts.append(_who(c.origin[i]))
        if i:
            parts.append(f"q {_g(q[i])}")
        x = tested.get(c.first[i])
        if x is not None:
            parts.append(f"p {_g(x.p)} r {_g(x.r)}" + (f" u {_g(x.u)}" if x.u is not None else ""))
        if s not in ("root", "accepted") and sizes[i] > 1:
            parts.append(f"(+{sizes[i] - 1} below)")
        line = "  ".join(parts)
        dim = s == "untried" or c.first[i] != i
        return paint("dim" if dim else s, line) if s != "root" else line

    def walk(i: int, prefix: str):
        ranked = sorted(kids[i], key=lambda j: (RANK[status[j]], -logq[j], j))
        shown = sorted(ranked[:width])
        rest = ranked[width:]
        for n, j in enumerate(shown):
            last = n == len(shown) - 1 and not rest
            lines.append(prefix + ("└── " if last else "├── ") + node_line(j))
            if status[j] == "accepted":
                walk(j, prefix + ("    " if last else "│   "))
        if rest:
            counts = [(sum(status[j] == s for j in rest), s)
                      for s in ("rejected", "untried", "pruned")]
            what = ", ".join(f"{k} {s.replace('untried', 'not tried')}" for k, s in counts if k)
            lines.append(prefix + "└── " + paint("dim", f"… {len(rest)} more: {what}"))

    lines.append("  " + node_line(0))
    walk(0, "  ")
    d = c.draw
    how = (f"the residual (mass {_g(d.residual_mass)} left)" if d.kind == "correction" else "p")
    lines.append(f"  drew {label(d.token, d.text)} after #{d.node}, the {d.kind} from {how}: "
                 f"probability {_g(d.prob)}")
    return "\n".join(lines)


def render_text(trace: Trace, width: int = 4, colour: bool = False) -> str:
    return "\n\n".join(render_call(c, width, colour) for c in trace.calls)


def show(trace: Trace):
    """`taps.py --show`: every call as text, coloured when printed to a terminal."""
    print(render_text(trace, colour=sys.stdout.isatty()) + "\n")


# ------------------------------------------------------------------------- a page (--trace-html)

COL, BOX_W, BOX_H, ROW, PAD = 214, 104, 18, 24, 12
FILL = {"root": "#dddddd", "accepted": "#bfe8c4", "rejected": "#f5c2c2", "untried": "#f7f7f7",
        "pruned": "#ffffff", "draw": "#cfe0ff"}
PRUNED = "#aaaaaa"     # a pruned node's outline and text
DRAFTER = ["#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _stroke(origin: frozenset[int]) -> str:
    """An outline for who drafted a node (`_who`): grey the root, black several drafters."""
    return ("#555555" if not origin else "#000000" if len(origin) > 1
            else DRAFTER[min(origin) % len(DRAFTER)])


def layout(c: Call) -> dict:
    """(column, row) of every node and of the draw ("draw", a last child of its node): leaves
    take rows in depth-first order, a parent sits midway between its first and last child."""
    kids, pos, rows = c.children(), {}, 0

    def place(i, depth):
        nonlocal rows
        below = [] if i == "draw" else [*kids[i], *(["draw"] if i == c.draw.node else [])]
        for j in below:
            place(j, depth + 1)
        pos[i] = (depth, (pos[below[0]][1] + pos[below[-1]][1]) / 2 if below else rows)
        rows += not below

    place(0, 0)
    return pos


def svg_call(c: Call) -> str:
    """One call's tree as inline SVG: fill by status (the draw in blue), outline by drafter
    (dashed: a copy verified as its first; grey and dashed: a pruned node), edges labelled with q
    and, where tested, p; hover a node for its numbers."""
    t, status, q, tested, pos = c.tree, c.status(), c.q(), c.tested(), layout(c)
    xy = {i: (PAD + d * COL, PAD + r * ROW) for i, (d, r) in pos.items()}
    width = PAD * 2 + max(d for d, _ in pos.values()) * COL + BOX_W
    height = PAD * 2 + (max(r for _, r in pos.values()) + 1) * ROW
    esc = lambda s: html.escape(str(s), quote=True)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="monospace" font-size="11">']

    def edge(a, b, text, dashed=False):
        (x1, y1), (x2, y2) = xy[a], xy[b]
        x1, y1, y2, xm = x1 + BOX_W, y1 + BOX_H / 2, y2 + BOX_H / 2, (x1 + BOX_W + x2) / 2
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        out.append(f'<path d="M{x1:.0f},{y1:.1f} C{xm:.0f},{y1:.1f} {xm:.0f},{y2:.1f} {x2:.0f},'
                   f'{y2:.1f}" fill="none" stroke="#999999"{dash}/>')
        out.append(f'<text x="{x2 - 4:.0f}" y="{y2 - 3:.1f}" text-anchor="end" font-size="9" '
                   f'fill="#444444">{esc(text)}</text>')

    def box(i, fill, stroke, text, tip, dashed=False, ink="#000000"):
        x, y = xy[i]
        short = text if len(text) <= 14 else text[:13] + "…"
        dash = ' stroke-dasharray="3 2" fill-opacity="0.5"' if dashed else ""
        out.append(f'<g><title>{esc(tip)}</title><rect x="{x:.0f}" y="{y:.1f}" width="{BOX_W}" '
                   f'height="{BOX_H}" rx="4" fill="{fill}" stroke="{stroke}" stroke-width="2"'
                   f'{dash}/><text x="{x + 5:.0f}" y="{y + 13:.1f}" fill="{ink}">{esc(short)}'
                   f'</text></g>')

    for i in range(1, len(t)):
        x = tested.get(c.first[i])
        edge(t.parents[i], i, f"q {_g(q[i])}" + (f" p {_g(x.p)}" if x else ""))
    for x in c.pruned:
        edge(x.parent, x.id, f"q {_g(x.q)}", dashed=True)
    d = c.draw
    edge(d.node, "draw", f"{d.kind} {_g(d.prob)}", dashed=True)
    for i in range(len(t)):
        x, text = tested.get(c.first[i]), label(t.tokens[i], c.text[i] if c.text else None)
        tip = [f"#{i} token {t.tokens[i]} {text}: {status[i]}"]
        if i:
            tip.append(f"drafter {_who(c.origin[i])}, q {_g(q[i])}, log q {_g(t.logq[i])}")
        if c.first[i] != i:
            tip.append(f"a copy of #{c.first[i]}: verified as one node")
        if x:
            tip.append(f"p {_g(x.p)}, r {_g(x.r)}" + (f", u {_g(x.u)}" if x.u is not None else ""))
        box(i, FILL[status[i]], _stroke(c.origin[i]), text, "; ".join(tip), c.first[i] != i)
    for x in c.pruned:
        box(x.id, FILL["pruned"], PRUNED, label(x.token, x.text),
            f"#{x.id} token {x.token}: drafted by {_who(x.origin)} and pruned; q {_g(x.q)}, "
            f"log q {_g(x.logq)}", True, PRUNED)
    box("draw", FILL["draw"], "#3060c0", label(d.token, d.text),
        f"drawn after #{d.node} ({d.kind}): probability {_g(d.prob)}, residual mass "
        f"{_g(d.residual_mass)}")
    out.append("</svg>")
    return "\n".join(out)


STYLE = """body { font-family: sans-serif; margin: 1.5em; color: #222; }
section { border-top: 1px solid #ccc; padding-top: 0.5em; margin-top: 1em; }
.key { display: inline-block; padding: 0 0.5em; margin-right: 0.3em; border: 2px solid #555; }
svg { display: block; margin: 0.5em 0; }"""


def render_html(trace: Trace, title: str = "taps trace") -> str:
    """One self-contained page (XHTML: it parses as XML): a list of the calls, then each call's
    summary, routing, tree (`svg_call`) and draw, with links to the previous and next call."""
    esc = lambda s: html.escape(str(s), quote=True)
    ids = [f"call-{c.generation}-{c.index}" for c in trace.calls]
    key = "".join(f'<span class="key" style="background:{FILL[s]}">{s}</span>'
                  for s in ("accepted", "rejected", "untried", "draw"))
    key += f'<span class="key" style="border: 2px dashed {PRUNED}; color: {PRUNED}">pruned</span>'
    drafters = sorted({o for c in trace.calls for o in c.origin[1:]}, key=sorted)
    key += "".join(f'<span class="key" style="border-color:{_stroke(o)}">drafter {_who(o)}</span>'
                   for o in drafters)
    meta = "; ".join(f"{k}: {v}" for k, v in (trace.calls[0].meta if trace.calls else {}).items())
    out = ['<!DOCTYPE html>', '<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head>',
           f'<meta charset="utf-8"/><title>{esc(title)}</title><style>{STYLE}</style></head><body>',
           f'<h1>{esc(title)}</h1><p>{esc(meta)}</p>',
           f'<p>Fill: status of the node (a dashed outline: a merged tree\'s copy of a token path, '
           f'verified as one node); outline: the drafter. {key}</p>',
           '<p>Edges: q, the draft probability given the parent, and p, the target\'s, where the '
           'child was tested; hover a node for r(s), the uniform drawn and log q. Grey, dashed: '
           'nodes a drafter drafted and the rerank (prune) dropped before the call.</p><ol>']
    out += [f'<li><a href="#{a}">{esc(summary(c))}</a></li>' for a, c in zip(ids, trace.calls)]
    out.append("</ol>")
    for n, (a, c) in enumerate(zip(ids, trace.calls)):
        nav = " · ".join(f'<a href="#{ids[m]}">{w}</a>' for m, w in ((n - 1, "previous"),
                                                                     (n + 1, "next"))
                         if 0 <= m < len(ids))
        out.append(f'<section id="{a}"><h2>{esc(summary(c))}</h2><p>{nav}</p>')
        if c.routing is not None:
            out.append(f"<p>{esc(routing(c.routing))}</p>")
        out.append(svg_call(c))
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- files

def check_destinations(jsonl: Optional[Path] = None, page: Optional[Path] = None):
    """Before any model loads: the trace files can be written, and they are two files."""
    for path, flag in ((jsonl, "--trace"), (page, "--trace-html")):
        if path is not None:
            check_writable(Path(path), flag)
    if jsonl and page and Path(jsonl).resolve() == Path(page).resolve():
        raise TapsError(f"--trace and --trace-html name one file ({jsonl}); give two paths")


def save(trace: Trace, jsonl: Optional[Path] = None, page: Optional[Path] = None,
         title: str = "taps trace"):
    """Write the kept calls as JSON lines and/or as a page, each file atomically."""
    for path, text, flag in ((jsonl, lambda: "".join(json.dumps(record(c)) + "\n"
                                                     for c in trace.calls), "--trace"),
                             (page, lambda: render_html(trace, title), "--trace-html")):
        if path is not None:
            with writing(path, f"choose another {flag} path"):
                atomic_write(Path(path), lambda tmp: tmp.write_text(text(), encoding="utf-8"))


@contextlib.contextmanager
def streamed(path: Optional[Path], decode=None):
    """A Trace that writes each call to `path` as a JSON line when it is made (`eval.py --trace`:
    too many calls to keep), or None without a path. Lines go to a temporary file, renamed over
    `path` at the end and on Ctrl-C (every line a whole call); an error removes it."""
    if path is None:
        yield None
        return
    path, advice = Path(path), "choose another --trace path"
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with writing(path, advice):
        f = open(tmp, "w", encoding="utf-8")

    def sink(line: dict):
        with writing(path, advice):
            f.write(json.dumps(line) + "\n")
    keep = False
    try:
        yield Trace(decode, sink)
        keep = True
    except (KeyboardInterrupt, SystemExit):
        keep = True
        raise
    finally:
        f.close()
        if keep:
            with writing(path, advice):
                os.replace(tmp, path)
        else:
            tmp.unlink(missing_ok=True)

