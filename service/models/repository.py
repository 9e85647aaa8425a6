"""The model repository: which model versions are loaded, which one serves each model, and leases that
keep a version loaded while requests use it. No Flask in here.

A repository is a folder of `NAME/VERSION/` artifact folders (VERSION a positive integer), each what
`python -m training.run --repository DIR --name NAME` writes; a lone artifact folder (ARTIFACTS_DIR) is
served as the one version of the model `char-lstm`. Each model's newest `MODEL_VERSIONS` versions that
pass verification are loaded; the newest serves requests that name the model, and the others answer
requests pinned to them (`NAME@VERSION`).

`sync()` brings the loaded versions in line with the folders: it loads and verifies new versions beside
the serving ones, makes each new version serving only once it is loaded, and retires versions whose
folders went away or fell out of the newest `MODEL_VERSIONS`. A retired version leaves the tables at once,
so no new request gets it, and is unloaded when its last lease ends: requests and streams finish on the
version they started on. A folder that fails verification (half copied, truncated, tampered, another
format) is refused with one log line and a metric, and looked at again only when its files change, so a
copy in progress is neither loaded half-written nor refused for good. Each gunicorn worker syncs on its
own: when it starts, every REPOSITORY_POLL_SECONDS, and when the master gets SIGHUP.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from seqmodels.artifacts import (
    MODEL_NAME,
    WEIGHTS_FILE,
    ArtifactError,
    LoadedModels,
    load_artifacts,
    versions_in,
)
from service.engine.engine import Engine
from service.engine.lstm_kernels import off_the_scheduler
from service.metrics import (
    MODEL_LOAD_SECONDS,
    MODEL_MEMORY_BYTES,
    MODEL_SERVING_VERSION,
    MODEL_TRAFFIC_WEIGHT,
    MODEL_VERSIONS_REFUSED,
    PREFIX_CACHE_SHARED_BYTES,
)
from service.models.quality_gate import QualityGate
from service.models.shadow import Kind, ShadowConfig, ShadowRunner
from service.models.traffic import TrafficError, TrafficPlan, pick, read_traffic_file, settings_weights
from service.models.versions import (
    VERSION_SEPARATOR,
    Fingerprint,
    ModelNotFound,
    ModelVersion,
    Refusal,
    SighupCounter,
    fingerprint,
    give_back_freed_memory,
    parse_model,
)
from service.settings import Settings

log = logging.getLogger("service.models.repository")

SINGLE_MODEL = "char-lstm"  # the name of the model in ARTIFACTS_DIR when there is no repository
WATCH_TICK_SECONDS = 0.2  # how often a worker's watcher looks for a SIGHUP


class ModelRepository:
    def __init__(
        self,
        settings: Settings,
        build_engine: Callable[[LoadedModels, str], Engine],
        on_loaded: Callable[[ModelVersion], None] | None = None,
    ) -> None:
        """`build_engine(models, id)` makes the engine of a loaded version (its id names it in metrics);
        `on_loaded(version)` gives the version its session codec and precision before it can serve."""
        self.settings = settings
        self.build_engine = build_engine
        self.on_loaded = on_loaded
        self.sighup = SighupCounter()
        self._models: dict[str, dict[int, ModelVersion]] = {}  # name -> version -> loaded version
        self._weights: dict[str, dict[int, float]] = {}  # name -> version -> weight, where weights are set
        self._shadows: dict[str, ShadowConfig] = {}  # name -> its shadow candidate, where it has one
        self.shadow = ShadowRunner(self.acquire_version, self.release)
        self.quality_gate = QualityGate(settings)
        try:
            self._configured_weights = settings_weights(settings.traffic_weights)
        except TrafficError as exc:
            log.error("%s; the newest version of each model takes its traffic", exc)
            self._configured_weights = {}
        self._refused: dict[Path, Refusal] = {}
        self._draining: set[ModelVersion] = set()  # retired versions that requests still hold
        self._lock = threading.Lock()  # the tables and the leases
        self._sync_lock = threading.Lock()  # one sync at a time
        self._last_unknown_sync = 0.0
        self._unknown_lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        # Versions this process unloaded: /metrics leaves out their series (service.metrics.render).
        self.unloaded_ids: set[str] = set()
        self._memory_to_give_back = False  # a version was unloaded since the last give_back_freed_memory
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._unknown_lock = threading.Lock()
        self._watcher = None

    # ------------------------------------------------------------------ what is on disk

    def _folders(self) -> dict[str, list[tuple[int, Path]]]:
        """Every model's version folders on disk, newest first."""
        root = self.settings.model_repository
        if root is None:
            return {SINGLE_MODEL: [(1, self.settings.artifacts_dir)]}
        if not root.is_dir():
            return {}
        found = {}
        for model_dir in sorted(root.iterdir()):
            if model_dir.is_dir() and MODEL_NAME.match(model_dir.name):
                versions = versions_in(model_dir)
                if versions:
                    found[model_dir.name] = [(v, model_dir / str(v)) for v in reversed(versions)]
        return found

    # ------------------------------------------------------------------ loading

    def sync(self, forget_refusals: bool = False) -> list[str]:
        """Load what is new, retire what is gone; returns one line per change, for the log and tests.
        `forget_refusals` looks again at refused folders even if their files did not change (SIGHUP)."""
        with self._sync_lock:
            if forget_refusals:
                self._refused.clear()
            changes: list[str] = []
            try:
                folders = self._folders()
            except OSError as exc:  # an ESTALE or EIO from the volume: serve what is loaded, look again later
                log.error("could not list the model repository (%s); the loaded versions serve on", exc)
                return changes
            for name in sorted(set(self._models) - set(folders)):
                changes += self._publish(name, [], "its folder is gone")
            for name, versions in folders.items():
                try:
                    changes += self._sync_model(name, versions)
                except Exception:  # one model's surprise must not stop the others' sync
                    log.exception("syncing model %s failed; its loaded versions are unchanged", name)
            for line in changes:
                log.info("%s", line)
        self.give_back_unloaded()
        return changes

    def _sync_model(self, name: str, folders: list[tuple[int, Path]]) -> list[str]:
        """Choose the model's newest `MODEL_VERSIONS` loadable versions, loading what is new beside the
        versions that serve, then publish the choice."""
        keep: list[ModelVersion] = []
        table = self._models.get(name, {})
        for version, path in folders:
            if len(keep) == self.settings.model_versions:
                break
            loaded = table.get(version)
            current = fingerprint(path)
            if loaded is not None and loaded.fingerprint == current:
                keep.append(loaded)
                continue
            older = sorted((mv for v, mv in table.items() if v < version), key=lambda mv: -mv.version)
            stays = keep + older[: self.settings.model_versions - len(keep) - 1]
            if not self._worth_a_look(path, current, self._memory_in_use(name, stays)):
                if loaded is not None:  # its files changed into something refused: the loaded copy serves on
                    keep.append(loaded)
                continue
            mv = self._load(name, version, path, current, stays)
            if mv is not None:
                keep.append(mv)
            elif loaded is not None:
                keep.append(loaded)
        plan = self._read_traffic(name)
        keep = self._gate(name, keep, table, plan.weights)
        return self._publish(name, keep, "newer versions replaced it", on_disk={v for v, _ in folders}, plan=plan)

    def _read_traffic(self, name: str) -> TrafficPlan:
        """The model's traffic.json, else TRAFFIC_WEIGHTS; on a bad file, what is in force."""
        root = self.settings.model_repository
        try:
            found = read_traffic_file(root / name) if root is not None else None
        except TrafficError as exc:
            log.error("%s; the traffic in force stays", exc)
            return TrafficPlan(weights=self._weights.get(name), shadow=self._shadows.get(name))
        if found is not None and found.weights is not None:
            return found
        return TrafficPlan(weights=self._configured_weights.get(name), shadow=found.shadow if found else None)

    def _gate(
        self, name: str, keep: list[ModelVersion], table: dict[int, ModelVersion], weights: dict[int, float] | None
    ) -> list[ModelVersion]:
        """The quality gate (service.models.quality_gate): a version loaded by this sync that would take
        unpinned traffic is compared with the version that takes it now (at start-up, the next version
        kept) and refused, unloaded, if it is worse by more than QUALITY_GATE_BITS."""
        before = self.serving(name)
        kept = list(keep)
        for mv in keep:
            if table.get(mv.version) is mv or not self._takes_traffic(mv, kept, weights):
                continue
            baseline = before if before is not None else next((o for o in kept if o is not mv), None)
            if baseline is None or baseline is mv:
                continue
            verdict = self.quality_gate.judge(mv, baseline)
            if verdict is not None:
                kept.remove(mv)
                mv.engine.close()
                self._refuse(mv.path, mv.fingerprint, "quality", f"{mv.id}: {verdict}")
        return kept

    @staticmethod
    def _takes_traffic(mv: ModelVersion, keep: list[ModelVersion], weights: dict[int, float] | None) -> bool:
        effective = effective_weights(keep, weights)
        return effective.get(mv.version, 0.0) > 0

    def _publish(
        self,
        name: str,
        keep: list[ModelVersion],
        why: str,
        on_disk: set[int] | None = None,
        plan: TrafficPlan | None = None,
    ) -> list[str]:
        """Make `keep` the model's loaded versions, with their weights, in one swap of the tables (a reader
        sees the old set or the new one, never a model without versions between them), then retire the
        versions left out."""
        was = self._models.get(name, {})
        was_serving = self.serving(name)
        was_weights = self.weights_in_force(name)
        weights = plan.weights if plan is not None else None
        with self._lock:
            models, all_weights, shadows = dict(self._models), dict(self._weights), dict(self._shadows)
            if keep:
                models[name] = {mv.version: mv for mv in keep}
            else:
                models.pop(name, None)
            if keep and weights:
                all_weights[name] = weights
            else:
                all_weights.pop(name, None)
            if keep and plan is not None and plan.shadow is not None:
                shadows[name] = plan.shadow
            else:
                shadows.pop(name, None)
            self._models, self._weights, self._shadows = models, all_weights, shadows
        changes = []
        now_weights = self.weights_in_force(name)
        if now_weights != was_weights:
            for mv in keep:
                MODEL_TRAFFIC_WEIGHT.labels(model=mv.id).set(now_weights.get(mv.version, 0.0))
            if len(keep) > 1 or weights:
                shares = ", ".join(f"{v}: {w:.0%}" for v, w in sorted(now_weights.items()) if w > 0)
                changes.append(f"model {name}: traffic {shares}")
        now_serving = self.serving(name)
        if now_serving is not was_serving:
            MODEL_SERVING_VERSION.labels(model=name).set(0 if now_serving is None else now_serving.version)
            if now_serving is not None:
                changes.append(f"model {name}: version {now_serving.version} serves")
        for mv in was.values():
            if mv not in keep:
                gone = on_disk is not None and mv.version not in on_disk
                replaced = any(k.version == mv.version for k in keep)
                reason = "its files changed" if replaced else "its folder is gone" if gone else why
                changes.append(self._retire(mv, reason))
        return changes

    def _worth_a_look(self, path: Path, current: Fingerprint, committed: int) -> bool:
        """A folder refused before is looked at again when its files changed, or (refused for memory) when
        what it would be loaded beside, `committed` (counted as at its refusal: the versions that would stay
        and those that requests still hold), is less than then: a lease that blocked it has ended, say."""
        refusal = self._refused.get(path)
        if refusal is None or refusal.fingerprint != current:
            return True
        return refusal.reason == "memory" and committed < refusal.memory_in_use

    def _memory_in_use(self, name: str | None = None, stays: list[ModelVersion] | None = None) -> int:
        """Bytes held by the loaded versions and by retired ones that requests still hold. With `name`, that
        model's versions count as `stays` (the versions this sync keeps), plus those still in use."""
        with self._lock:
            held = {
                id(mv): mv
                for n, versions in self._models.items()
                for mv in versions.values()
                if n != name or mv.leases > 0
            }
            held |= {id(mv): mv for mv in [*self._draining, *(stays or [])]}
        return sum(mv.memory_bytes for mv in held.values())

    def _build_if_unchanged(self, path: Path, before: Fingerprint, model_id: str) -> Engine | None:
        """The version's engine, or None where its files changed while they were read."""
        models = load_artifacts(path)
        return self.build_engine(models, model_id) if fingerprint(path) == before else None

    def _load(
        self, name: str, version: int, path: Path, before: Fingerprint, stays: list[ModelVersion]
    ) -> ModelVersion | None:
        """Verify and load one version folder, or refuse it (None) with a log line and a metric."""
        model_id = f"{name}{VERSION_SEPARATOR}{version}"
        budget = int(self.settings.model_memory_mb * 2**20)
        committed = self._memory_in_use(name, stays)
        weights = sum(size for rel, size, _ in before if rel.endswith(WEIGHTS_FILE))
        if committed + weights > budget:  # its weights alone would not fit: do not even read them
            return self._refuse(
                path, before, "memory", f"{model_id}: {self._over_budget(committed, weights)}", committed
            )
        started = time.perf_counter()
        try:
            # Reading the weights and probing the kernels run torch operators: not on this long-lived thread.
            engine = off_the_scheduler(lambda: self._build_if_unchanged(path, before, model_id))
            if engine is None:  # written to while we read it: looked at again at the next sync
                return self._refuse(path, before, "unverified", f"{model_id}: its files changed while loading")
        except ArtifactError as exc:
            return self._refuse(path, before, "unverified", f"{model_id}: {exc}")
        except Exception as exc:  # an unreadable file, a config too large to build: refused, never fatal
            return self._refuse(path, before, "unverified", f"{model_id}: {type(exc).__name__}: {exc}")
        mv = ModelVersion(
            name=name,
            version=version,
            path=path,
            engine=engine,
            fingerprint=before,
            memory_bytes=engine.memory_bytes(),
            load_seconds=time.perf_counter() - started,
        )
        if committed + mv.memory_bytes > budget:
            engine.close()
            message = f"{model_id}: {self._over_budget(committed, mv.memory_bytes)}"
            return self._refuse(path, before, "memory", message, committed)
        sizes = self.settings.warmup_sizes()
        if sizes:  # before it can serve: its first real requests do not pay the first calls' costs
            try:
                seconds = engine.warm_up(sizes, self.settings.warmup_prompt_chars)
            except Exception as exc:  # a version that cannot answer synthetic requests would not answer real ones
                engine.close()
                why = f"{model_id}: warmup failed: {type(exc).__name__}: {exc}"
                return self._refuse(path, before, "unverified", why)
            log.info("warmed up model %s in %.2f s (batches of %s)", model_id, seconds, ",".join(map(str, sizes)))
        if self.on_loaded is not None:
            self.on_loaded(mv)
        self._refused.pop(path, None)
        self.unloaded_ids.discard(mv.id)
        _set_gauges(mv)
        log.info(
            "loaded model %s from %s: %.1f MiB, manifest sha256 %s, %.2f s",
            model_id,
            path,
            mv.memory_bytes / 2**20,
            mv.digest[:16],
            mv.load_seconds,
        )
        return mv

    def _over_budget(self, committed: int, needed: int) -> str:
        return (
            f"needs {needed / 2**20:.1f} MiB beside the {committed / 2**20:.1f} MiB of the versions that stay "
            f"loaded or still answer requests, over MODEL_MEMORY_MB={self.settings.model_memory_mb:g}; raise it, "
            "or lower MODEL_VERSIONS"
        )

    def publish_gauges(self) -> None:
        """Set this process's gauges for every loaded version (a forked worker starts with none of its own)."""
        for mv in self.versions():
            _set_gauges(mv)
        for name in list(self._models):
            serving = self.serving(name)
            if serving is not None:
                MODEL_SERVING_VERSION.labels(model=name).set(serving.version)
            for version, share in self.weights_in_force(name).items():
                MODEL_TRAFFIC_WEIGHT.labels(model=f"{name}{VERSION_SEPARATOR}{version}").set(share)

    def _refuse(
        self, path: Path, current: Fingerprint, reason: str, message: str, committed: int = 0
    ) -> ModelVersion | None:
        self._refused[path] = Refusal(fingerprint=current, reason=reason, message=message, memory_in_use=committed)
        MODEL_VERSIONS_REFUSED.labels(reason=reason).inc()
        serving = self.serving(path.parent.name) if self.settings.model_repository is not None else None
        still = f"; {serving.id} goes on serving" if serving is not None else ""
        again = "when memory frees up" if reason == "memory" else "when its files change"
        log.error("refused model version %s%s; looking again %s", message, still, again)
        return None

    def _retire(self, mv: ModelVersion, why: str) -> str:
        """Mark a version that left the tables; it is unloaded now, or when its last lease ends."""
        with self._lock:
            mv.retired = True
            idle = mv.leases == 0
            if not idle:
                self._draining.add(mv)
        if idle:
            self._unload(mv)
        later = f"unloaded when its {mv.leases} running requests end"
        return f"model {mv.id} retired ({why}); " + ("unloaded" if idle else later)

    def _unload(self, mv: ModelVersion) -> None:
        mv.engine.close()
        self._memory_to_give_back = True
        if not any(other.id == mv.id for other in self.versions()):  # not replaced by a reload of its folder
            for gauge in (MODEL_MEMORY_BYTES, MODEL_LOAD_SECONDS, PREFIX_CACHE_SHARED_BYTES):
                gauge.labels(model=mv.id).set(0)  # multiprocess files keep a series: /metrics leaves it out
            self.unloaded_ids.add(mv.id)
        log.info("unloaded model %s", mv.id)

    # ------------------------------------------------------------------ serving

    def serving(self, name: str) -> ModelVersion | None:
        """The version that takes the largest share of the model's unpinned traffic (the newest of equals)."""
        versions = self._models.get(name)  # the tables are replaced, never changed in place: no lock needed
        if not versions:
            return None
        shares = effective_weights(list(versions.values()), self._weights.get(name))
        return versions[max(shares, key=lambda v: (shares[v], v))]

    def mirror(self, serving: ModelVersion, kind: Kind, text: str, serving_bits: float | None = None,
               serving_top1: str | None = None) -> None:  # fmt: skip
        """Offer a request's text for a shadow comparison, where the model has a shadow candidate loaded."""
        config = self._shadows.get(serving.name)
        if config is not None:
            candidate = self._models.get(serving.name, {}).get(config.version)
            self.shadow.offer(serving, candidate, config.percent, kind, text, serving_bits, serving_top1)

    def shadow_in_force(self, name: str) -> ShadowConfig | None:
        return self._shadows.get(name)

    def weights_in_force(self, name: str) -> dict[int, float]:
        """Each loaded version's share of the model's unpinned requests, from 0 to 1."""
        versions = self._models.get(name)
        if not versions:
            return {}
        shares = effective_weights(list(versions.values()), self._weights.get(name))
        total = sum(shares.values())
        return {v: shares.get(v, 0.0) / total for v in sorted(versions)}

    def default_name(self) -> str | None:
        if self.settings.default_model:
            return self.settings.default_model
        return min(self._models, default=None)

    def resolve(self, model: str | None, sticky: str | None = None) -> ModelVersion:
        """The version a request's `model` means (absent: DEFAULT_MODEL): the one it pins, or one of the
        model's by weight, by `sticky`'s hash where the request has a sticky key (service.models.traffic)."""
        name, version = parse_model(model) if model is not None else (self.default_name() or "", None)
        versions, weights = self._models.get(name), self._weights.get(name)  # one table, read once
        if not versions:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"The model `{model or name}` does not exist; the models are: {known}")
        if version is None:
            return versions[pick(effective_weights(list(versions.values()), weights), sticky)]
        if version not in versions:
            loaded = ", ".join(mv.id for mv in versions.values())
            raise ModelNotFound(f"The model `{model}` is not loaded; the loaded versions are: {loaded}")
        return versions[version]

    def acquire(self, model: str | None, sticky: str | None = None) -> ModelVersion:
        """Resolve `model` and hold its version loaded until `release`."""
        with self._lock:
            mv = self.resolve(model, sticky)
            mv.leases += 1
            return mv

    def acquire_version(self, mv: ModelVersion) -> bool:
        """Hold a version that was resolved earlier, if it still serves requests."""
        with self._lock:
            if mv.retired:
                return False
            mv.leases += 1
            return True

    def release(self, mv: ModelVersion) -> None:
        with self._lock:
            mv.leases -= 1
            unload = mv.retired and mv.leases == 0
            if unload:
                self._draining.discard(mv)
        if unload:
            self._unload(mv)

    def give_back_unloaded(self) -> None:
        """After an unload, once no table refers to the version: its memory back to the system (the watcher
        calls this every tick, for versions whose last request ended between syncs)."""
        if self._memory_to_give_back:
            self._memory_to_give_back = False
            give_back_freed_memory()

    def versions(self, name: str | None = None) -> list[ModelVersion]:
        """Loaded versions (of one model, or all), by name, newest first."""
        with self._lock:
            names = sorted(self._models) if name is None else [name]
            return [mv for n in names for _, mv in sorted(self._models.get(n, {}).items(), reverse=True)]

    def empty(self) -> bool:
        return not self._models

    def refusals(self) -> dict[str, Refusal]:
        return {str(path): refusal for path, refusal in self._refused.items()}

    # ------------------------------------------------------------------ watching

    def start_watching(self) -> None:
        """Sync now, then on a thread: every REPOSITORY_POLL_SECONDS (when > 0) and after each SIGHUP to the
        gunicorn master. Call it in each worker process after the fork, never in the master."""
        seen = self.sighup.value  # read first: a SIGHUP during this sync is not lost
        try:
            self.sync()
        except Exception:  # a worker must boot with what is loaded: a failure here would stop the server
            log.exception("model repository sync failed; the watcher looks again")
        self.publish_gauges()
        if self._watcher is not None:
            return
        self._watcher = threading.Thread(target=self._watch, args=(seen,), name="model-repository", daemon=True)
        self._watcher.start()

    def next_poll_after(self, now: float) -> float:
        """The next multiple of REPOSITORY_POLL_SECONDS on the wall clock: every worker of the pod (and
        every replica with a synchronised clock) looks at the same moments, so they change versions
        together rather than up to a poll apart."""
        poll = self.settings.repository_poll_seconds
        return (math.floor(now / poll) + 1) * poll

    def sync_for_unknown(self) -> bool:
        """A request names something this worker has not loaded (a session made by a version another worker
        loaded first): bring the loaded versions up to date now, then the caller looks again. A sync already
        running (the watcher's) is waited for rather than repeated; otherwise at most one a second, so that
        made-up handles cannot keep a worker syncing. Whether the caller should look again."""
        with self._unknown_lock:
            now = time.monotonic()
            if now - self._last_unknown_sync < 1.0 and not self._sync_lock.locked():
                return False
            self._last_unknown_sync = now
        self.sync()
        return True

    def _due_at(self) -> float:
        """The time.monotonic() of the next poll: aimed at the wall clock's next multiple, waited for on the
        monotonic clock (a wall clock stepped back does not hold polling up)."""
        now = time.time()
        return time.monotonic() + self.next_poll_after(now) - now

    def _watch(self, seen: int) -> None:
        poll = self.settings.repository_poll_seconds
        next_poll = self._due_at() if poll > 0 else 0.0
        while True:
            time.sleep(WATCH_TICK_SECONDS)
            self.give_back_unloaded()
            hup = self.sighup.value
            due = poll > 0 and time.monotonic() >= next_poll
            if hup == seen and not due:
                continue
            try:
                self.sync(forget_refusals=hup != seen)
            except Exception:  # the watcher must outlive a surprise; the serving versions are untouched
                log.exception("model repository sync failed")
            seen = hup
            next_poll = self._due_at() if poll > 0 else 0.0

    # ------------------------------------------------------------------ metadata


def effective_weights(versions: list[ModelVersion], weights: dict[int, float] | None) -> dict[int, float]:
    """The weights of the loaded `versions` (0 for those the weights leave out); without weights, or where
    none of the loaded versions has one above 0, the newest takes everything."""
    loaded = {mv.version for mv in versions}
    if weights:
        shares = {v: weights.get(v, 0.0) for v in loaded}
        if any(shares.values()):
            return shares
    return {v: (1.0 if v == max(loaded) else 0.0) for v in loaded}


def _set_gauges(mv: ModelVersion) -> None:
    MODEL_MEMORY_BYTES.labels(model=mv.id).set(mv.memory_bytes)
    MODEL_LOAD_SECONDS.labels(model=mv.id).set(mv.load_seconds)
    shared = mv.engine.prefix_cache.shared if mv.engine.prefix_cache is not None else None
    PREFIX_CACHE_SHARED_BYTES.labels(model=mv.id).set(0 if shared is None else shared.nbytes)
