"""Serving and batch reading on Ray: a thin layer over :class:`runtime.recognizer.Recognizer`.

* :mod:`serving.serve`: ``clipllama-serve``, a Ray Serve application (``POST /read``, ``GET /healthz``);
* :mod:`serving.client`: :class:`~serving.client.ReadClient`, the HTTP client that retries;
* :mod:`serving.batch`: ``clipllama-batch``, Ray Data reading of folders, label files, LMDBs and path lists.

Everything here needs the ``serve`` extra (``pip install 'clipllama[serve]'``) except the client.
"""
