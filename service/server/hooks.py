"""gunicorn's server hooks for the service, and what the master prepares before it loads the app: malloc
arenas, the folders for the workers' metrics and the shared prefix tables, one OpenMP thread."""

from __future__ import annotations

import ctypes
import os
import shutil
from typing import Any

from service.engine.shared_prefix_cache import detach_all
from service.server import connection_balancing
from service.server.owned_folders import owned_folder
from service.settings import Settings

_owned: list[str] = []  # folders this server made, removed when it exits


def limit_malloc_arenas() -> None:
    """glibc gives threads their own malloc arenas (up to 8 per core) and keeps what is freed in them,
    so request threads that each once held a scoring batch's activations leave a worker holding many
    times its working set; two arenas keep it near it. Called in the master, before any thread exists,
    so every forked worker inherits it; the MALLOC_ARENA_MAX variable (glibc's own) overrides the number."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_arena_max = -8  # from glibc's malloc.h
    libc.mallopt(m_arena_max, int(os.environ.get("MALLOC_ARENA_MAX", "2")))


def prepare_environment(settings: Settings) -> None:
    """Before the app is imported: where every process finds the metrics and the shared tables.

    Each worker writes its Prometheus values to files in PROMETHEUS_MULTIPROC_DIR and /metrics sums them
    (prometheus-client's multiprocess mode), so it is set before prometheus_client is imported. The
    pod-wide level of the prefix cache keeps tables in shared memory that every worker maps
    (service.engine.shared_prefix_cache), in a fresh folder per server start, on /dev/shm where it is
    writable (tmpfs; in a Kubernetes pod it counts against the pod's memory), removed at exit, and at the
    next start where a killed server left it. The master loads the models on one thread: an OpenMP thread
    team started before fork() is unusable in the forked workers (libgomp is not fork-safe)."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = owned_folder("charlm-metrics-", None)
        _owned.append(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    if settings.shared_cache_dir is None:
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        os.environ["SHARED_CACHE_DIR"] = owned_folder("charlm-states-", shm)
        _owned.append(os.environ["SHARED_CACHE_DIR"])
    if settings.quota_dir is None:
        os.environ["QUOTA_DIR"] = owned_folder("charlm-quotas-", None)
        _owned.append(os.environ["QUOTA_DIR"])
    if settings.sequence_dir is None:
        os.environ["SEQUENCE_DIR"] = owned_folder("charlm-sequences-", None)
        _owned.append(os.environ["SEQUENCE_DIR"])
    os.environ["OMP_NUM_THREADS"] = "1"
    if settings.balance_connections:
        # A few spare rows cover workers added at run time (TTIN) and replacements starting while others exit.
        connection_balancing.create_connection_table(slots=2 * settings.workers + 8)


def post_fork(server: Any, worker: Any) -> None:
    import torch

    models = worker.app.wsgi().extensions["models"]
    torch.set_num_threads(models.settings.torch_threads)
    # Each worker keeps its own model versions in line with the repository: it syncs now, before it
    # accepts a connection (a worker started after a rollout serves the new version from its first
    # request), then every REPOSITORY_POLL_SECONDS and on SIGHUP, on a thread of its own.
    models.repository.start_watching()


def when_ready(server: Any) -> None:
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
    detach_all()
    repository = server.app.wsgi().extensions["models"].repository

    def handle_hup() -> None:
        server.log.info("SIGHUP: the workers look at the model repository again")
        repository.sighup.bump()

    server.handle_hup = handle_hup


def pre_fork(server: Any, worker: Any) -> None:
    connection_balancing.claim_slot(worker)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
    connection_balancing.release_slot(worker)


def on_exit(server: Any) -> None:
    for owned in _owned:
        shutil.rmtree(owned, ignore_errors=True)
