"""Structured outputs: a grammar per constrained request, and the token mask of a step's constrained rows (xgrammar).

It lives in the engine core beside the scheduler, as vLLM v1's StructuredOutputManager does. A request's grammar is
compiled once per distinct spec (an LRU cache of compiled grammars shared by every request that asks for the same
schema, regex, choice or EBNF) and gets its own matcher, kept on its Sequence: the matcher advances with each token
the scheduler accepts, so a preempted sequence, recomputed from its tokens, keeps its place in the grammar, and an
aborted one simply drops it.

Each step, the sampler asks for the mask of the rows that sample under a grammar: one [n, ceil(V / 32)] int32
bitmask, filled for all constrained rows at once (xgrammar's BatchGrammarMatcher, on its own threads), applied to
the logits in one call. Rows without a grammar are neither filled nor touched, and a step with none pays nothing.

xgrammar rather than llguidance: its batch matcher fills every constrained row of a step in one call, and it is the
default backend of vLLM, so schemas, regexes and EBNF behave as vLLM users know them.
benchmarks/bench_grammar_mask.py measures the per-token mask cost of both libraries on a batch.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import Any

import torch

from moeserve.engine.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)


def grammar_source(spec: StructuredOutputsParams) -> tuple[str, str]:
    """(kind, source) xgrammar compiles for spec: a JSON schema, a regex or an EBNF grammar."""
    if spec.json is not None:
        return "json", spec.json
    if spec.json_object:
        return "json", '{"type": "object"}'  # as vLLM: json_object asks for an object, not any JSON value
    if spec.regex is not None:
        return "regex", spec.regex
    if spec.choice is not None:
        quoted = ('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in spec.choice)
        return "ebnf", "root ::= " + " | ".join(quoted)
    if spec.structural_tag is not None:
        return "structural_tag", spec.structural_tag
    return "ebnf", spec.grammar


class StructuredOutputManager:
    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        stop_token_ids: frozenset[int],
        cache_size: int = 256,
        max_threads: int | None = None,
    ) -> None:
        import xgrammar as xgr  # only engines that serve a constrained request load it

        self.xgr = xgr
        self.vocab_size = vocab_size  # the model's (it may pad the tokenizer's): masks cover every logit
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        threads = max_threads or min(8, os.cpu_count() or 1)
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)  # our cache: below
        self.batch = xgr.BatchGrammarMatcher(threads)
        self.cache: OrderedDict[StructuredOutputsParams, Any] = OrderedDict()
        self.cache_size = cache_size
        self.num_compiled = 0  # grammars compiled so far (a spec seen before is not compiled again)

    def compile(self, spec: StructuredOutputsParams):
        """The compiled grammar of spec, from the cache when seen before; ValueError for an invalid one."""
        if spec in self.cache:
            self.cache.move_to_end(spec)
            return self.cache[spec]
        kind, source = grammar_source(spec)
        try:
            if kind == "json":
                json.loads(source)  # xgrammar's own message for bad JSON is less clear
                compiled = self.compiler.compile_grammar(self._json_grammar(source))
            elif kind == "regex":
                compiled = self.compiler.compile_regex(source)
            elif kind == "structural_tag":
                compiled = self.compiler.compile_structural_tag(source)
            else:
                compiled = self.compiler.compile_grammar(source)
        except Exception as exc:  # xgrammar raises RuntimeError / its own errors for what it cannot compile
            raise ValueError(f"invalid {spec.kind} for structured output: {exc}") from exc
        self.num_compiled += 1
        self.cache[spec] = compiled
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return compiled

    def _json_grammar(self, schema: str):
        """JSON text of the schema, compact (", " and ": " between items: free whitespace lets a small model loop on
        it), after at most one space or newline: JSON allows leading whitespace, and BPE vocabularies often fold the
        space before a value into its first token (" {"), which a model prefers to "{"."""
        xgr = self.xgr
        body = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
        return xgr.Grammar.concat(xgr.Grammar.from_ebnf("root ::= [ \\n]?"), body)

    def matcher(self, spec: StructuredOutputsParams):
        """A fresh matcher (at the start of the grammar) for one request."""
        return self.xgr.GrammarMatcher(self.compile(spec))

    def apply_mask(self, logits: torch.Tensor, matchers: list) -> None:
        """Sets to -inf every logit [n, V] its row's grammar forbids next; rows whose matcher is None are left."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        bitmask = self.xgr.allocate_token_bitmask(logits.shape[0], self.vocab_size)  # [n, ceil(V / 32)] int32
        self.batch.batch_fill_next_token_bitmask([matchers[i] for i in rows], bitmask, rows)
        self.xgr.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device), vocab_size=self.vocab_size, indices=rows
        )


def grammar_finished(matcher, token_id: int) -> bool:
    """Advances a request's matcher by its sampled token; True when the grammar is finished (the request stops)."""
    if not matcher.accept_token(token_id):
        # The mask allowed only what the grammar accepts, so this is a bug, not the request's fault.
        logger.error("the grammar refused token %d that its own mask allowed", token_id)
        return True
    return matcher.is_terminated()
