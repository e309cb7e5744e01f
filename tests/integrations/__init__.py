"""Integration tests: ``idemfn.celery`` and ``idemfn.rq`` under real Celery and RQ worker
processes (duplicates, redelivery after SIGKILL, retries), and their rules in-process."""
