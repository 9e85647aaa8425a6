"""The gunicorn side: the worker class (requests read whole in its event loop, admission, connection
balancing), the request framing it parses with, the server hooks and the WSGI entry point."""
