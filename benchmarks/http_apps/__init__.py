"""The benchmark's own small HTTP apps (``bench_http.py``): one route that answers at once and
one that counts its runs and takes ~50 ms, in Starlette, Flask and Django, each served bare, with
idemfn's middleware, or with a peer's, as the environment says (see ``common``)."""
