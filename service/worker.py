"""The gunicorn worker class: gunicorn's threaded worker, with a prompter refusal of new work on SIGTERM."""

from __future__ import annotations

from gunicorn.workers.gthread import ThreadWorker


class GracefulThreadWorker(ThreadWorker):
    """On SIGTERM the stock worker stops polling its listening sockets but keeps them open until its
    in-flight requests finish, so the kernel goes on queueing new connections that nobody will answer:
    clients hang for up to the graceful timeout and are then reset. Closing the listeners as soon as the
    worker stops accepting makes new connections fail at once (the master has already closed its copy),
    which lets a client or load balancer retry elsewhere while streams in progress run to their end."""

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()
