"""The web applications that ``tests/integrations/http/`` serves with real servers (uvicorn,
gunicorn): a Starlette app, a FastAPI app, a Flask app and a Django project, all with the same
routes and the same idemfn middleware options, read from the environment (see ``shared``).
"""
