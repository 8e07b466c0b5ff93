"""The correction step: a confidence gate and a small LLM that fix doubtful words.

Modules, in the order a word meets them:

- :mod:`~runtime.correction.settings`: the nested, typed settings a bundle carries;
- :mod:`~runtime.correction.contract`: the :class:`Corrector` protocol and the
  :class:`Correction` result the recognizer reads;
- :mod:`~runtime.correction.gate` and :mod:`~runtime.correction.review`: which words are
  reviewed, and why;
- :mod:`~runtime.correction.candidates` (with :mod:`~runtime.correction.lexicon`):
  candidates from the decoder's top-k and the word lists;
- :mod:`~runtime.correction.score`: a candidate's score as named terms and one weight vector;
- :mod:`~runtime.correction.decide`: the keep-or-replace rule;
- :mod:`~runtime.correction.fill`: the fill mode;
- :mod:`~runtime.correction.backend`: the llama.cpp model behind the ``LLMBackend`` protocol;
- :mod:`~runtime.correction.corrector`: :class:`LLMCorrector`, which puts them together.

This package's ``__init__`` imports nothing: :mod:`runtime.decoding` reads its settings
module, and the corrector reads the decoding module.
"""
