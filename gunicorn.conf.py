"""Gunicorn settings for the service; each can be overridden by an environment variable.

The machine this targets has 2 cores. Two worker processes each get one torch thread, so
inference never runs more compute threads than cores. In each worker, one scheduler thread
does all the model's work, stepping every concurrent request's sequences as one batch
(BATCHING=1, the default); the request threads only parse, wait and write, so a worker
needs many of them (THREADS) to serve many clients at once.
"""

import ctypes
import os
import shutil
import warnings

from service.settings import Settings
from service.shared_cache import owned_folder
from service.worker import claim_slot, create_connection_table, release_slot


def _limit_malloc_arenas() -> None:
    """glibc gives threads their own malloc arenas (up to 8 per core) and keeps what is freed in them,
    so request threads that each once held a scoring batch's activations leave a worker holding many
    times its working set; two arenas keep it near it. Set here, in the master, before any thread
    exists, so every forked worker inherits it; the MALLOC_ARENA_MAX variable overrides the number."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_arena_max = -8  # from glibc's malloc.h
    libc.mallopt(m_arena_max, int(os.environ.get("MALLOC_ARENA_MAX", "2")))


_limit_malloc_arenas()

# The image leaves out numpy, which the service never uses; torch would warn about it at import.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WORKERS", "2"))
worker_class = "service.worker.GracefulThreadWorker"  # gthread, reading requests whole in its event loop
threads = int(os.environ.get("THREADS", "32"))  # concurrent requests per worker
timeout = int(os.environ.get("TIMEOUT", "60"))  # a worker silent this long is restarted
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "30"))  # SIGTERM: in-flight requests get this long
# The connection limits are the service's settings (service/settings.py), read from the same variables.
_settings = Settings()
keepalive = _settings.keepalive_seconds  # KEEPALIVE_SECONDS
worker_connections = _settings.max_connections  # MAX_CONNECTIONS, per worker; more wait in the listen queue
backlog = 2048  # the listen queue
# gunicorn's header limits (its defaults, stated): longer request lines or fields, or more fields, get 400;
# the worker's event loop stops reading a header block that cannot fit them and answers 431.
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190
preload_app = True  # load and verify the artifacts once, in the master, before forking; a bad artifact stops start-up
accesslog = None  # the app writes one JSON access line per request, with its request id
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
wsgi_app = "service.wsgi:application"
control_socket_disable = True  # no runtime control socket: nothing should reconfigure a serving container

# Each worker writes its Prometheus values to files here and /metrics sums them (prometheus-client's
# multiprocess mode). It must be set before the app, and so prometheus_client, is imported.
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = owned_folder("charlm-metrics-", None)
    _owned_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
else:
    _owned_metrics_dir = ""

# The pod-wide level of the prefix cache: tables in shared memory that every worker maps (service/
# shared_cache.py), in a fresh folder per server start, on /dev/shm where it is writable (tmpfs; in a
# Kubernetes pod it counts against the pod's memory), removed at exit, and at the next start where a killed
# server left it. Each table reserves its pages when it is made and takes no more than the filesystem has
# free (docs/deployment.md says how to size /dev/shm). SHARED_PREFIX_CACHE_MB=0 turns it off.
if "SHARED_CACHE_DIR" not in os.environ:
    _shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    os.environ["SHARED_CACHE_DIR"] = owned_folder("charlm-states-", _shm)
    _owned_cache_dir = os.environ["SHARED_CACHE_DIR"]
else:
    _owned_cache_dir = ""

# The master loads the models on one thread (create_app sees to that for torch): an OpenMP thread team
# started before fork() is unusable in the forked workers (libgomp is not fork-safe), which would leave
# them slow or hung. Each worker sets its own thread count (TORCH_THREADS) after the fork.
os.environ["OMP_NUM_THREADS"] = "1"


def post_fork(server, worker):
    import torch

    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "1")))
    # Each worker keeps its own model versions in line with the repository: it syncs now, before it
    # accepts a connection (a worker started after a rollout serves the new version from its first
    # request), then every REPOSITORY_POLL_SECONDS and on SIGHUP, on a thread of its own.
    worker.app.wsgi().extensions["models"].repository.start_watching()


def when_ready(server):
    """SIGHUP to the master makes every worker look at the model repository again (new, changed and removed
    versions, and folders refused before), without restarting a worker or cutting a request. This replaces
    gunicorn's own SIGHUP (reload the configuration, replace every worker): the configuration here comes
    from the environment, which a running process cannot change, and replacing workers would cut streams
    longer than GRACEFUL_TIMEOUT."""
    from prometheus_client import multiprocess

    # The master loaded the models before forking, and so set their gauges in its own file; the workers
    # set their own when they start. Dropping the master's keeps sums over the workers true.
    multiprocess.mark_process_dead(os.getpid())
    # The master loaded the models, so it made and mapped their shared tables; the workers map them again
    # after the fork, and the master lets go of them so that it keeps no page of a retired version alive.
    from service.shared_cache import detach_all

    detach_all()
    repository = server.app.wsgi().extensions["models"].repository

    def handle_hup():
        server.log.info("SIGHUP: the workers look at the model repository again")
        repository.sighup.bump()

    server.handle_hup = handle_hup


# Workers spread connections evenly through a table in shared memory (see service/worker.py); a
# few spare rows cover workers added at run time (TTIN) and replacements starting while others exit.
# BALANCE_CONNECTIONS=0 leaves accepting to gunicorn's stock behaviour (whichever worker wakes first).
if os.environ.get("BALANCE_CONNECTIONS", "1") != "0":
    create_connection_table(slots=2 * workers + 8)


def pre_fork(server, worker):
    claim_slot(worker)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
    release_slot(worker)


def on_exit(server):
    for owned in (_owned_metrics_dir, _owned_cache_dir):
        if owned:
            shutil.rmtree(owned, ignore_errors=True)
