"""XGrammar against llguidance on what a constraint costs our sampler per step.

For a batch of B rows, each with its own matcher walking a valid JSON document of a
schema token by token: the time to fill the rows' token bitmasks, apply them to
float32 logits [B, vocab] and advance every matcher by its token; next to it, the
sampler's own step on the same logits (what the constraint adds to). Also each
library's compile time for the schema (cold) and for a matcher from the compiled
grammar. CPU only (the per-row mask fill runs on the host in both libraries).

    python benchmarks/structured_backends.py [--batch 1 32 256] [--steps 40]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import pagedserve  # noqa: F401 - before torch: it sets how OpenMP threads wait (passive)
import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
        "address": {"$ref": "#/$defs/address"},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
    "$defs": {"address": {"type": "object", "properties": {
        "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["city", "zip"], "additionalProperties": False}},
}
DOC = ('{"name": "Ada Lovelace", "age": 36, "tags": ["red", "blue"], '
       '"address": {"city": "London", "zip": "10001"}}')


@functools.lru_cache(maxsize=1)
def load_tokenizer():
    from pagedserve.model.loader import load_tokenizer as load, resolve_model

    return load(resolve_model(None))


class XGrammarRows:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.vocab = vocab

    def compile(self):
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)

    def matchers(self, compiled, n):
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def bitmask(self, n):
        return self.xgr.allocate_token_bitmask(n, self.vocab)

    def fill(self, ms, mask):
        for i, m in enumerate(ms):
            m.fill_next_token_bitmask(mask, i)

    def apply(self, logits, mask):
        self.xgr.apply_token_bitmask_inplace(logits, mask)

    def accept(self, m, token):
        assert m.accept_token(token), "xgrammar rejected a token of a valid document"

    def reset(self, m):
        m.reset()


class LLGuidanceRows:
    name = "llguidance"

    def __init__(self, tokenizer, vocab):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.llt = llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.vocab = vocab

    def compile(self):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            json.dumps(SCHEMA), defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        m = self.llg.LLMatcher(self.tok, grammar)
        assert not m.is_error(), m.get_error()
        return grammar

    def matchers(self, grammar, n):
        return [self.llg.LLMatcher(self.tok, grammar) for _ in range(n)]

    def bitmask(self, n):
        return self.llt.allocate_token_bitmask(n, self.vocab)

    def fill(self, ms, mask):
        for i, m in enumerate(ms):
            self.llt.fill_next_token_bitmask(m, mask, i)

    def apply(self, logits, mask):
        self.llt.apply_token_bitmask_inplace(logits, mask)

    def accept(self, m, token):
        assert m.consume_token(token), m.get_error()

    def reset(self, m):
        m.reset()


def timed(fn, repeat=5):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run_backend(rows, doc_tokens, batch, steps):
    from pagedserve.engine.batch import SeqWork
    from pagedserve.runner.sampler import Sampler
    from pagedserve.sampling_params import SamplingParams

    compile_s, compiled = timed(rows.compile, repeat=3)
    matcher_s, _ = timed(lambda: rows.matchers(compiled, 1), repeat=5)
    ms = rows.matchers(compiled, batch)
    pos = [r % len(doc_tokens) for r in range(batch)]  # rows at different places
    for m, p in zip(ms, pos):
        for t in doc_tokens[:p]:
            rows.accept(m, t)
    mask = rows.bitmask(batch)
    logits = torch.randn(batch, rows.vocab)
    params = SamplingParams(temperature=0.8, max_tokens=256)
    works = [SeqWork(i, [0], 0, [0], True, params, [1], [], 0) for i in range(batch)]
    sampler = Sampler("cpu", seed=0)
    sampler.sample(logits.clone(), works).results()
    rows.apply(logits.clone(), mask)  # first calls may compile a kernel: not a step's cost
    rows.apply(logits.clone(), mask)
    fill = apply = accept = sample = 0.0
    for _ in range(steps):
        x = logits.clone()
        t0 = time.perf_counter()
        rows.fill(ms, mask)
        t1 = time.perf_counter()
        rows.apply(x, mask)
        t2 = time.perf_counter()
        for r, m in enumerate(ms):
            rows.accept(m, doc_tokens[pos[r]])
            pos[r] += 1
            if pos[r] == len(doc_tokens):
                rows.reset(m)
                pos[r] = 0
        t3 = time.perf_counter()
        sampler.sample(logits.clone(), works).results()
        t4 = time.perf_counter()
        fill += t1 - t0
        apply += t2 - t1
        accept += t3 - t2
        sample += t4 - t3
    ms_ = 1e3 / steps
    return {"backend": rows.name, "batch": batch, "compile_ms": compile_s * 1e3,
            "matcher_ms": matcher_s * 1e3, "fill_ms": fill * ms_, "apply_ms": apply * ms_,
            "accept_ms": accept * ms_, "sampler_ms": sample * ms_,
            "added_pct": 100 * (fill + accept) / sample}


def document_masks(batch: int, vocab: int) -> torch.Tensor:
    """The masks a batch really carries: row r's is XGrammar's after the first r tokens
    of DOC (modulo its length), so the rows cover every place in the document."""
    tokenizer = load_tokenizer()
    doc = tokenizer(DOC, add_special_tokens=False)["input_ids"]
    rows = XGrammarRows(tokenizer, vocab)
    compiled = rows.compile()
    mask = rows.bitmask(batch)
    for r, m in enumerate(rows.matchers(compiled, batch)):
        for token in doc[: r % len(doc)]:
            rows.accept(m, token)
        m.fill_next_token_bitmask(mask, r)
    return mask


def apply_kernels(batches: list[int], vocab: int, repeat: int = 8) -> None:
    """Ways to put a bitmask on float32 logits [B, vocab], timed interleaved in one
    process (minimum of `repeat`), all checked to give the same logits; on random
    masks (every 32-token word mixed: the worst case for a kernel that skips whole
    words) and on the masks of a real document (document_masks)."""
    import numpy as np
    import xgrammar as xgr

    shifts = torch.arange(32, dtype=torch.int32)
    # byte -> its 8 bits as "masked" flags (bit clear); token 8 * byte index + i is bit i
    # of that byte on a little-endian host.
    bits_of_byte = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1) == 0
    print("\nmasks     batch  xgrammar_ms  llguidance_torch_ms  numpy_unpackbits_ms  "
          "broadcast_shift_ms  byte_table_ms  engine_ms")
    from pagedserve.structured.backend import XGrammarBackend

    engine_backend = XGrammarBackend(None, vocab, frozenset())
    for kind in ("random", "document"):
        for b in batches:
            logits = torch.randn(b, vocab)
            if kind == "random":
                mask = torch.randint(-2**31, 2**31 - 1, (b, vocab // 32), dtype=torch.int32)
            else:
                mask = document_masks(b, vocab)

            def xgrammar_kernel(x):
                xgr.apply_token_bitmask_inplace(x, mask, indices=list(range(b)))

            def llguidance_torch(x):
                import llguidance.torch

                llguidance.torch.apply_token_bitmask_inplace(x, mask)

            def numpy_unpackbits(x):
                bits = np.unpackbits(mask.numpy().view(np.uint8), axis=1, bitorder="little")
                x.masked_fill_(~torch.from_numpy(bits.view(bool))[:, :vocab], float("-inf"))

            def broadcast_shift(x):
                bits = ((mask.unsqueeze(-1) >> shifts) & 1).view(b, -1)[:, :vocab]
                x.masked_fill_(bits == 0, float("-inf"))

            def byte_table(x):
                masked = bits_of_byte[mask.view(torch.uint8).long()].view(b, -1)[:, :vocab]
                x.masked_fill_(masked, float("-inf"))

            def engine(x):  # what the engine does: per row, XGrammar's kernel or unpacking
                engine_backend.apply_bitmask(x, mask, list(range(b)))

            kernels = (xgrammar_kernel, llguidance_torch, numpy_unpackbits, broadcast_shift,
                       byte_table, engine)
            expected = logits.clone()
            xgrammar_kernel(expected)
            best = dict.fromkeys(kernels, float("inf"))
            for k in kernels:
                x = logits.clone()
                k(x)
                assert torch.equal(x, expected), k.__name__
            for _ in range(repeat):
                for k in kernels:
                    x = logits.clone()
                    t = time.perf_counter()
                    k(x)
                    best[k] = min(best[k], time.perf_counter() - t)
            print(f"{kind:<8}  {b:>5}  " + "  ".join(
                f"{1e3 * best[k]:>{w}.2f}" for k, w in zip(kernels, (11, 19, 19, 18, 13, 9))),
                flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--kernels-only", action="store_true",
                   help="only compare the ways to apply a bitmask")
    args = p.parse_args()
    torch.set_num_threads(1)
    vocab = 49152  # SmolLM2's embedding rows
    if args.kernels_only:
        apply_kernels(args.batch, vocab)
        return
    tokenizer = load_tokenizer()
    doc_tokens = tokenizer(DOC, add_special_tokens=False)["input_ids"]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"1 thread, vocab {vocab}, document of {len(doc_tokens)} tokens")
    print("backend     batch  compile_ms  matcher_ms  fill_ms  apply_ms  accept_ms  "
          "sampler_ms  (fill+accept)/sampler%")
    for cls in (XGrammarRows, LLGuidanceRows):
        rows = cls(tokenizer, vocab)
        for b in args.batch:
            r = run_backend(rows, doc_tokens, b, args.steps)
            print(f"{r['backend']:<11} {b:>5}  {r['compile_ms']:>10.2f}  {r['matcher_ms']:>10.3f}"
                  f"  {r['fill_ms']:>7.3f}  {r['apply_ms']:>8.3f}  {r['accept_ms']:>9.3f}"
                  f"  {r['sampler_ms']:>10.3f}  {r['added_pct']:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
