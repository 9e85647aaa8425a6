"""Gunicorn settings for the service, from the service's `Settings` (environment variables, read once here).

The machine this targets has 2 cores. Two worker processes each get one torch thread, so
inference never runs more compute threads than cores. In each worker, one scheduler thread
does all the model's work, stepping every concurrent request's sequences as one batch
(BATCHING=1, the default); the request threads only parse, wait and write, so a worker
needs many of them (THREADS) to serve many clients at once.
"""

import warnings

from service.server import hooks
from service.server.hooks import child_exit, on_exit, post_fork, pre_fork, when_ready
from service.settings import Settings

hooks.limit_malloc_arenas()
# The image leaves out numpy, which the service never uses; torch would warn about it at import.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

_settings = Settings()
hooks.prepare_environment(_settings)

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.workers
worker_class = "service.server.worker.GracefulThreadWorker"  # gthread, reading requests whole in its event loop
threads = _settings.threads  # concurrent requests per worker
timeout = _settings.timeout  # a worker silent this long is restarted
graceful_timeout = _settings.graceful_timeout  # SIGTERM: in-flight requests get this long
keepalive = _settings.keepalive_seconds
worker_connections = _settings.max_connections  # per worker; more wait in the listen queue
backlog = 2048  # the listen queue
# gunicorn's header limits (its defaults, stated): longer request lines or fields, or more fields, get 400;
# the worker's event loop stops reading a header block that cannot fit them and answers 431.
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190
preload_app = True  # load and verify the artifacts once, in the master, before forking; a bad artifact stops start-up
accesslog = None  # the app writes one JSON access line per request, with its request id
errorlog = "-"
loglevel = _settings.log_level.lower()
wsgi_app = "service.server.wsgi:application"
control_socket_disable = True  # no runtime control socket: nothing should reconfigure a serving container

__all__ = ["child_exit", "on_exit", "post_fork", "pre_fork", "when_ready"]  # gunicorn's server hooks
