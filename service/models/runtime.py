"""The models a process serves: the repository of versions with the engine of each, its session codec and
precision. No Flask here: the app registers one with `init_app` and the views reach it through
`service.api.context`."""

from __future__ import annotations

import hashlib
import logging
import secrets
import tempfile
from pathlib import Path
from typing import Any

import torch

from seqmodels.artifacts import LoadedModels
from service.engine.engine import Engine, EngineOptions
from service.engine.lstm_kernels import choose_precision
from service.engine.prefix_cache import PrefixCache
from service.engine.shared_prefix_cache import SharedStates
from service.models.repository import ModelRepository
from service.models.sequences import SequenceStore
from service.models.sessions import SessionCodec
from service.models.version_metrics import VersionMetrics
from service.models.versions import ModelVersion, RepositoryError
from service.settings import Settings

log = logging.getLogger("service")


class ModelRuntime:
    """The loaded models of one process: the repository of versions, how each version's engine is built, and
    the key that signs session handles. One per app, kept in `app.extensions["models"]` by `init_app`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Made here, in the gunicorn master before it forks (preload_app), so every worker signs and
        # checks session handles with the same key; SESSION_SECRET keeps it across restarts and replicas.
        secret = settings.session_secret.encode()
        self.session_key = (
            hashlib.sha256(b"charlm-session-key\0" + secret).digest() if secret else secrets.token_bytes(32)
        )
        self.dtype, self.precision_reason = choose_precision(settings.precision)
        self.precision = str(self.dtype).removeprefix("torch.")
        log.info("weights in %s (%s)", self.precision, self.precision_reason)
        self.repository = ModelRepository(settings, self._build_engine, self._add_session_codec)
        if settings.sequence_dir is None:  # no server made one: this process's own, removed at its exit
            self._own_sequence_dir = tempfile.TemporaryDirectory(prefix="charlm-sequences-")
            folder = Path(self._own_sequence_dir.name)
        else:
            folder = settings.sequence_dir
        self.sequences = SequenceStore(folder, settings.sequence_idle_seconds, settings.max_sequences)

    def _shared_states(self, models: LoadedModels, model_id: str) -> SharedStates | None:
        """The pod-wide level of the version's prefix cache, where gunicorn.conf.py made a folder for it."""
        folder, size = self.settings.shared_cache_dir, int(self.settings.shared_prefix_cache_mb * 2**20)
        if folder is None or size == 0 or self.settings.prefix_cache_mb == 0:
            return None
        config = models.lm.config
        state = torch.Size([config.num_layers, config.hidden_size])
        name = f"{model_id}-{models.digest[:16]}-{self.precision}.states"
        try:
            shared = SharedStates(folder / name, size, (state, state, torch.Size([models.vocab.size])))
        except OSError as exc:  # a folder gone or read-only: the version serves without the shared level
            log.error("shared prefix cache for %s is off: %s", model_id, exc)
            return None
        return shared

    def _build_engine(self, models: LoadedModels, model_id: str) -> Engine:
        cache_bytes = int(self.settings.prefix_cache_mb * 2**20)
        observer = VersionMetrics(model_id)
        cache = None
        if cache_bytes > 0:
            cache = PrefixCache(cache_bytes, self._shared_states(models, model_id), observer)
        return Engine(models, EngineOptions.from_settings(self.settings, self.dtype), cache, observer)

    def _add_session_codec(self, mv: ModelVersion) -> None:
        """Session handles are signed with the version's id and manifest hash: another version finds nothing,
        even one with the same files."""
        config = mv.engine.lm.config
        mv.sessions = SessionCodec(
            self.session_key,
            self.settings.session_ttl_seconds,
            f"{mv.id}\0{mv.digest}",
            config.num_layers,
            config.hidden_size,
            mv.engine.vocab.size,
        )
        mv.precision = {"dtype": self.precision, "chosen": self.precision_reason}

    def init_app(self, app: Any) -> None:
        """Register with a Flask app (as a Flask extension does); the views find it with `runtime()`."""
        app.extensions["models"] = self

    def load(self) -> None:
        """Load every model at start-up; RepositoryError when nothing can serve (fail fast)."""
        self.repository.sync()
        loaded = self.repository.versions()
        if not loaded:
            refused = "; ".join(r.message for r in self.repository.refusals().values())
            where = self.settings.model_repository or self.settings.artifacts_dir
            raise RepositoryError(f"no model could be loaded from {where}" + (f": {refused}" if refused else ""))
        default = self.repository.default_name()
        if default is not None and self.repository.serving(default) is None:
            names = ", ".join(sorted({mv.name for mv in loaded}))
            raise RepositoryError(f"DEFAULT_MODEL {default!r} is not among the loaded models ({names})")
