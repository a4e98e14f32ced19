"""XGrammar, the grammar engine behind the constraints.

Chosen over llguidance on our sampler's per-step cost (docs/structured_output.md): its
per-token mask comes from a cache built at compile time, so filling a row's mask is
5-30x cheaper than llguidance's on-the-fly computation; the price is a compile of
milliseconds to seconds per schema, which runs off the step loop and is cached
(compiler.py). Imported on the first constraint: unconstrained serving never loads it.

Grammar syntax (`grammar=`): XGrammar's EBNF, the GBNF dialect of llama.cpp
(`root ::= "a" rule*`, character classes, `?`, `*`, `+`, `{m,n}`); the start rule is
`root`. JSON output is compact (", " and ": " separators, no other whitespace), so a
model cannot spend its tokens on whitespace.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from typing import Any

from pagedserve.errors import InvalidRequestError, invalid_sampling
from pagedserve.structured.spec import ConstraintSpec

# XGrammar prefixes its messages with "[time] /path/file.cc:line: ".
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
_MAX_REASON = 400
# A CPU row is masked by unpacking its bits when more than 1/this of its 32-token words
# disallow all 32 (apply_bitmask): about where the two ways cost the same.
_DENSE_SHARE = 6


class XGrammarBackend:
    """Compiles constraints and makes per-sequence matchers for one tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int],
                 tokenizer_info: Any = None):
        """`tokenizer_info`: XGrammar's view of a vocabulary given directly, for a model
        without a Hugging Face tokenizer (the tests' small vocabularies)."""
        import xgrammar

        self.xgr = xgrammar
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._eos = sorted(eos_token_ids)
        self._info = tokenizer_info
        self._compiler = None
        self._lock = threading.Lock()
        # One bitmask reused step after step (bitmask()), the engine thread's alone.
        self._bitmask = None
        self._pinned = False
        self._copied = None  # CUDA event: the last copy from a pinned bitmask has run

    def _get_compiler(self) -> Any:
        with self._lock:  # first use: the vocabulary is read once, by one thread
            if self._compiler is None:
                info = self._info
                if info is None:
                    info = self.xgr.TokenizerInfo.from_huggingface(
                        self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._eos)
                # Our pool gives the parallelism: one thread per compile.
                self._compiler = self.xgr.GrammarCompiler(info, max_threads=1,
                                                          cache_enabled=False)
            return self._compiler

    def compile(self, spec: ConstraintSpec) -> Any:
        """The compiled grammar; InvalidRequestError `<field>: <reason>` when it does not
        compile."""
        compiler = self._get_compiler()
        try:
            if spec.kind == "json_schema":
                _check_schema(spec.text)
                return compiler.compile_json_schema(spec.text, any_whitespace=False)
            if spec.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.text)
            if spec.kind == "grammar":
                return compiler.compile_grammar(spec.text)
            if spec.kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.choices))
        except InvalidRequestError:
            raise
        except ValueError as exc:
            raise invalid_sampling(f"{spec.kind}: {_reason(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - the library's errors are the request's
            raise invalid_sampling(f"{spec.kind} does not compile: {_reason(exc)}") from None
        raise ValueError(f"unknown constraint kind {spec.kind!r}")

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def allocate_bitmask(self, rows: int) -> Any:
        return self.xgr.allocate_token_bitmask(rows, self.vocab_size)

    def bitmask(self, rows: int, pinned: bool = False) -> Any:
        """A [rows, vocab/32] int32 bitmask for one step, the same memory every step (it
        grows when a batch outgrows it): a fill writes its whole row, and only the rows
        filled this step are applied, so what earlier steps left is never read.
        `pinned` (logits on CUDA): page-locked, so the copy to the device is a DMA queued
        behind the forward that leaves the host free; the memory is handed out again
        only once the last such copy from it has run. For the engine's step thread only."""
        if self._copied is not None:
            self._copied.synchronize()  # done long ago in practice: the step's results came
            self._copied = None
        if self._bitmask is None or self._bitmask.shape[0] < rows or self._pinned != pinned:
            import torch

            words = (self.vocab_size + 31) // 32
            self._bitmask = torch.full((rows, words), -1, dtype=torch.int32, pin_memory=pinned)
            self._pinned = pinned
        return self._bitmask[:rows]

    def apply_bitmask(self, logits: Any, bitmask: Any, rows: list[int]) -> None:
        """-inf on the logits of every token a row's mask disallows, for those rows only.

        On CPU the cheapest way depends on the mask (docs/structured_output.md):
        XGrammar's kernel costs per disallowed token, so it is the fastest by far on a
        row that allows most of the vocabulary (inside a string), but several times
        slower than unpacking every bit (numpy) and one masked_fill on a row that
        allows few tokens (between a JSON document's keys and values). A row goes the
        second way when more than 1/_DENSE_SHARE of its 32-token words are all
        disallowed, a count over its bitmask words alone."""
        if bitmask.device != logits.device:
            pinned = bitmask.is_pinned()
            bitmask = bitmask.to(logits.device, non_blocking=True)
            if pinned:  # bitmask() waits for this copy before handing the memory out again
                import torch

                self._copied = torch.cuda.Event()
                self._copied.record()
        elif logits.device.type == "cpu" and sys.byteorder == "little":
            rows = self._unpack_dense_rows(logits, bitmask, rows)
            if not rows:
                return
        self.xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size,
                                             indices=rows)

    def _unpack_dense_rows(self, logits: Any, bitmask: Any, rows: list[int]) -> list[int]:
        """Masks the rows that disallow most tokens by unpacking their bits; returns the
        others. Little-endian: token 32 w + i is bit i of word w, so bit i of byte b."""
        import numpy as np
        import torch

        words = bitmask.numpy()[rows]
        dense = (words == 0).sum(axis=1) * _DENSE_SHARE > words.shape[1]
        if not dense.any():
            return rows
        vocab = self.vocab_size
        allowed = np.unpackbits(words[dense].view(np.uint8), axis=1, bitorder="little")
        allowed = torch.from_numpy(allowed[:, :vocab].view(bool))
        for j, row in enumerate(r for r, d in zip(rows, dense) if d):
            logits[row, :vocab].masked_fill_(~allowed[j], float("-inf"))
        return [r for r, d in zip(rows, dense) if not d]


def choice_grammar(choices: list[str]) -> str:
    """EBNF for exactly one of `choices` (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _check_schema(text: str) -> None:
    """A schema that is not a valid JSON Schema (by its meta-schema) fails here with
    jsonschema's reason, rather than being read loosely by the converter."""
    import jsonschema

    schema = json.loads(text)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise invalid_sampling(f"json_schema is not a valid JSON Schema at {where}: "
                               f"{exc.message[:_MAX_REASON]}") from None


def _reason(exc: BaseException) -> str:
    text = _CPP_PREFIX.sub("", str(exc).strip()).strip()
    return (text or type(exc).__name__)[:_MAX_REASON]
