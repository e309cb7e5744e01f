"""The HTTP middlewares' shared core: one decision for ASGI, WSGI and Django.

``idemfn.asgi``, ``idemfn.wsgi`` and ``idemfn.django`` are thin drivers of what is here:

- ``options``: ``HttpOptions``, the middlewares' options, validated once (errors name them);
- ``request``: ``Request``, the view of a request the ``scope``, ``fingerprint`` and
  ``deadline`` callables get in ASGI and WSGI apps;
- ``exchange``: the key header's parsing, the problem+json answers, the recorded response
  and its codec, the decision on a key (``start``/``astart`` on ``idemfn.begin``'s engine) and
  the settling of a claim once the app has answered.

The semantics are the IETF Idempotency-Key draft's, with IdempotencyPlug's rule for a first
request that crashed (500 "interrupted", never a second run): see the documentation's HTTP page.
"""
