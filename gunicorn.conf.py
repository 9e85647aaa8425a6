"""Gunicorn settings for the service; each can be overridden by an environment variable.

The machine this targets has 2 cores. Two worker processes each get one torch thread, so
inference never runs more compute threads than cores; a few gthreads per worker overlap
request I/O with the other requests' compute (torch releases the GIL while it computes).
"""

import os

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WORKERS", "2"))
worker_class = "gthread"
threads = int(os.environ.get("THREADS", "4"))
timeout = int(os.environ.get("TIMEOUT", "60"))  # a worker silent this long is restarted
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "30"))  # SIGTERM: in-flight requests get this long
keepalive = 5
preload_app = True  # load and verify the artifacts once, in the master, before forking; a bad artifact stops start-up
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
wsgi_app = "service.app:create_app()"
control_socket_disable = True  # no runtime control socket: nothing should reconfigure a serving container

# Torch reads this when a process starts; 1 thread per worker avoids oversubscribing the cores.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("TORCH_THREADS", "1"))


def post_fork(server, worker):
    import torch

    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "1")))
