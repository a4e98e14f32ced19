"""Structured output: constraints (JSON Schema, any JSON object, regex, EBNF grammar,
a choice of strings) that keep every sampled token inside a grammar.

- spec.py: what a request asks for (validated with SamplingParams, no library needed);
- backend.py: XGrammar, the grammar engine (compiles, builds matchers, applies masks);
- compiler.py: compiles on a thread pool, cached by constraint, with a time limit;
- admission.py: the engine's side: requests wait here until their grammar compiled;
- logits.py: the sampler's side: per-sequence matchers and the token bitmask.
"""

from pagedserve.structured.spec import ConstraintSpec, constraint_of

__all__ = ["ConstraintSpec", "constraint_of"]
