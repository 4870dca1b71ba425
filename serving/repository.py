"""The model repository: `<root>/<name>/<version>/model.onnx + model.json` (Triton's layout).

Every model under the root is served at the versions its `VersionPolicy` selects (Triton's
`version_policy`): by default its newest version that loads (Triton's "latest 1"), else the N newest
that load, all that load, or specific version numbers. A request for version 0 goes to the newest
loaded version, or for the default model to its `default_version` while that one is loaded
(`cyborg serve --default-version`; when it is not, the newest, with a warning each reload). On a
GPU, where the newest is an int8 graph (made for CPUs) and the fp32 version it was quantised from
is served too, version 0 goes to that fp32 version.
`reload()` rescans: a new or changed version is loaded and warmed off the event loop before it
replaces the old one, which is unloaded once its in-flight requests finish; a version that fails
(bad checksum, corrupt ONNX, bad model.json, wrong outputs) is logged, counted in
`cyborg_model_load_failure` and skipped, and the other versions keep serving. A folder without
model.json yet (an export in progress) is left alone until it has one. `unload_model(name)` stops
serving a model until `load_model(name)` (the Open Inference Protocol's load/unload extension,
behind `cyborg serve --model-load-api`); reloads leave such a model unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from serving.batcher import BULK_PIECE_DIVISOR, Batcher
from core.contract import CONTRACT_FILE, ONNX_FILE, TENSORRT_FILE, ModelContract, read_contract
from core.errors import ContractError
from serving.errors import ModelNotFound, ModelNotReady, quote
from serving.metrics import Metrics
from engines.runtime import Backend, OnnxRuntimeBackend, load_backend

log = logging.getLogger(__name__)


VERSION_POLICY_FORMS = "latest (the newest version that loads), latest:N (the N newest that load, N >= 1), all, or version numbers such as 6,7"


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    """Which versions of each model serve (Triton's `version_policy`; `cyborg serve --version-policy`).

    `latest` N: the N newest versions that load (a broken version's place goes to the next older
    one); `all`: every version that loads; `specific`: those of `versions` that load.
    """

    kind: str = "latest"  # latest | all | specific
    count: int = 1  # latest: how many versions
    versions: tuple[int, ...] = ()  # specific: which versions, newest first

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`latest`, `latest:N`, `all` or a comma list of version numbers; UserError otherwise."""
        from core.errors import UserError

        value = text.strip().lower()
        if value == "latest":
            return cls()
        if value == "all":
            return cls("all")
        count = value.removeprefix("latest:")
        if count != value and re.fullmatch(r"[0-9]{1,9}", count.strip()) and int(count) >= 1:
            return cls("latest", int(count))
        items = [item.strip() for item in value.split(",")]
        if count == value and all(re.fullmatch(r"[0-9]{1,18}", item) and int(item) >= 1 for item in items):
            return cls("specific", versions=tuple(sorted({int(item) for item in items}, reverse=True)))
        raise UserError(f"--version-policy {text[:80]!r}: expected {VERSION_POLICY_FORMS}")

    def check_default(self, version: int) -> None:
        """UserError unless `cyborg serve --default-version version` may be served under this policy
        (0: the newest; by its form, a `specific` policy must list it; `latest:N` is checked after loading)."""
        from core.errors import UserError

        if version < 0:
            raise UserError(f"--default-version {version}: must not be negative (0 = the newest served version)")
        if version and not self.wants(version):
            raise UserError(f"--default-version {version}: --version-policy {self} does not serve version {version} (list it in --version-policy, or choose one of {self})")

    def __str__(self) -> str:
        if self.kind == "specific":
            return ",".join(map(str, self.versions))
        return "all" if self.kind == "all" else f"latest:{self.count}"

    def wants(self, version: int) -> bool:
        """Whether the policy may serve `version` at all."""
        return self.kind != "specific" or version in self.versions

    def enough(self, chosen: int) -> bool:
        """Whether `chosen` loaded versions (taken newest first) fill the policy."""
        return self.kind == "latest" and chosen >= self.count


@dataclasses.dataclass(frozen=True)
class RepositorySettings:
    backend: str = "auto"
    device: str = "auto"
    intra_op_threads: int = 0
    max_batch_size: int | None = None  # None: the model's model.json "batching"
    max_queue_delay_ms: float | None = None
    max_queue_size: int | None = None
    max_inflight_batches: int = 1
    default_model: str = ""
    bulk_lane: bool = True  # large raw requests on a second, one-thread, low-priority engine (ONNX Runtime on CPU)
    version_policy: VersionPolicy = VersionPolicy()  # which versions of each model serve (default: the newest that loads)
    default_version: int = 0  # the default model's version for requests that name none while it is loaded; 0: the newest


@dataclasses.dataclass
class VersionStatus:
    name: str
    version: int
    state: str  # READY | UNAVAILABLE (failed) | UNLOADED (not chosen by the version policy) | INCOMPLETE (no model.json yet)
    error: str = ""
    contract: ModelContract | None = None


@dataclasses.dataclass
class ReloadReport:
    loaded: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    unloaded: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)


def scan(root: str | os.PathLike[str]) -> dict[str, list[tuple[int, Path]]]:
    """{model name: [(version, folder), ...] newest first} for the repository at root."""
    root = Path(root)
    found: dict[str, list[tuple[int, Path]]] = {}
    if not root.is_dir():
        return found
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = [(int(p.name), p) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0]
        if versions:
            found[model_dir.name] = sorted(versions, reverse=True)
    return found


def signature(folder: Path) -> tuple:
    """What changes when a version folder's files are rewritten."""
    stats = []
    for name in (CONTRACT_FILE, ONNX_FILE, TENSORRT_FILE):
        try:
            stat = (folder / name).stat()
            stats.append((name, stat.st_mtime_ns, stat.st_size))
        except FileNotFoundError:
            pass
    return tuple(stats)


def check_folder(folder: Path, contract: ModelContract) -> None:
    """A contract must match the folder it sits in (`<name>/<version>`)."""
    from core.errors import ContractError

    if contract.name != folder.parent.name or contract.version != int(folder.name):
        raise ContractError(
            f"{folder / CONTRACT_FILE}: says {contract.name!r} v{contract.version} but sits in {folder.parent.name}/{folder.name}"
        )


class LoadedModel:
    """One loaded, warmed model version with its batcher; counts requests using it."""

    def __init__(self, contract: ModelContract, folder: Path, backend: Backend, batcher: Batcher, sig: tuple, bulk_backend: Backend | None = None):
        self.contract = contract
        self.folder = folder
        self.backend = backend
        self.bulk_backend = bulk_backend
        self.batcher = batcher
        self.signature = sig
        self._users = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def key(self) -> tuple[str, int]:
        return (self.contract.name, self.contract.version)

    @contextlib.contextmanager
    def use(self) -> Iterator[LoadedModel]:
        """Hold the model while a request uses it; unloading waits for every holder."""
        self._users += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self._users -= 1
            if self._users == 0:
                self._idle.set()

    async def unload(self) -> None:
        await self._idle.wait()
        await self.batcher.close()


class ModelRepository:
    """Loads, serves and reloads every model under a repository root."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        settings: RepositorySettings = RepositorySettings(),
        metrics: Metrics | None = None,
        on_change: Callable[[ModelRepository], object] | None = None,
    ):
        self.root = Path(root)
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.on_change = on_change
        self._models: dict[str, dict[int, LoadedModel]] = {}  # name -> {version: loaded model}, newest first
        self._failed: dict[tuple[str, int], tuple[tuple, str]] = {}  # (name, version) -> (signature, error)
        self._known: dict[str, list[tuple[int, Path]]] = {}
        self._held: set[str] = set()  # models unloaded on request: reloads leave them unloaded
        self._gpu_notes: dict[str, tuple[int, int] | None] = {}  # name -> (newest int8 on CUDA, its served fp32 source or 0), as last logged
        self._lock = asyncio.Lock()
        self._loaded_once = False
        self._poller: asyncio.Task | None = None

    # ---- queries -------------------------------------------------------------------------
    @property
    def default_name(self) -> str:
        if self.settings.default_model:
            return self.settings.default_model
        names = sorted(self._models) or sorted(self._known)
        return names[0] if names else ""

    def ready(self) -> bool:
        return self._loaded_once and bool(self._models)

    def loaded(self) -> list[LoadedModel]:
        """Every loaded model version, by name, newest version first."""
        return [self._models[name][version] for name in sorted(self._models) for version in sorted(self._models[name], reverse=True)]

    def get(self, name: str = "", version: int = 0) -> LoadedModel:
        """The loaded model version for a request (version 0: the newest loaded); ModelNotFound /
        ModelNotReady name the problem."""
        name = name or self.default_name
        if not name:
            raise ModelNotFound(f"no model is served: {self.root} holds no model version folders")
        versions = self._models.get(name)
        if not versions:
            if name in self._held:
                raise ModelNotReady(f"model {name!r} was unloaded on request (RepositoryModelUnload); RepositoryModelLoad serves it again")
            if name in self._known:
                errors = [f"v{v}: {e}" for (n, v), (_, e) in sorted(self._failed.items()) if n == name] or self._unselected(name)
                raise ModelNotReady(f"model {name!r} has no loaded version" + (f" ({'; '.join(errors)})" if errors else ""))
            served = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"unknown model {quote(name)} (serving: {served})")
        if not version:
            return versions[self.default_version(name)]
        model = versions.get(version)
        if model is None:
            served = sorted(versions, reverse=True)
            plural = "s" if len(served) > 1 else ""
            raise ModelNotFound(f"model {name!r} version {version} is not served (serving version{plural} {', '.join(map(str, served))})")
        return model

    def default_version(self, name: str = "") -> int:
        """The version a request for `name` (empty: the default model) that names none gets: the
        settings' `default_version` for the default model while it is loaded, else the newest loaded (on
        CUDA, the served fp32 source of a newest int8 version: `gpu_fp32_source`); 0 if none."""
        name = name or self.default_name
        versions = self._models.get(name, {})
        if name == self.default_name and self.settings.default_version in versions:
            return self.settings.default_version
        newest = max(versions, default=0)
        return gpu_fp32_source(versions, newest) or newest

    def check_default_version(self) -> None:
        """At start-up: UserError naming `--default-version` and `--version-policy` when the default
        model has loaded versions but not `default_version`."""
        from core.errors import UserError

        problem = self._default_version_problem()
        if problem:
            raise UserError(f"--default-version {self.settings.default_version}: {problem}")

    def _default_version_problem(self) -> str:
        """Why the default model serves, but not at `default_version` (empty when it does, or serves nothing)."""
        wanted, name = self.settings.default_version, self.default_name
        versions = self._models.get(name)
        if not wanted or not versions or wanted in versions:
            return ""
        served = ", ".join(map(str, sorted(versions, reverse=True)))
        folders = dict(self._known.get(name, []))
        if wanted not in folders:
            why = f"{self.root / name / str(wanted)} does not exist"
        elif (name, wanted) in self._failed:
            why = f"it failed to load: {self._failed[(name, wanted)][1]}"
        elif not (folders[wanted] / CONTRACT_FILE).exists():
            why = f"it has no {CONTRACT_FILE} yet"
        else:
            why = "the policy leaves it out"
        return f"model {name!r} version {wanted} is not served under --version-policy {self.settings.version_policy} (serving {served}; {why})"

    def _warn_default_version(self) -> None:
        """Log (once a reload, not each request) when requests naming no version fall back to the newest."""
        problem = self._default_version_problem()
        if problem:
            name = self.default_name
            log.warning("--default-version %s: %s: requests naming no version get v%s", self.settings.default_version, problem, self.default_version(name),
                        extra={"model": name, "version": self.settings.default_version})  # fmt: skip

    def _note_gpu_defaults(self) -> None:
        """Log, when it changes, that a model's versionless requests get the fp32 source of its
        newest (int8) version on a GPU, or that the source would but is not served."""
        for name in sorted(set(self._models) | set(self._gpu_notes)):
            versions = self._models.get(name, {})
            newest = max(versions, default=0)
            source = gpu_fp32_source(versions, newest)
            explicit = name == self.default_name and self.settings.default_version in versions
            note = (newest, source) if versions and versions[newest].backend.device == "cuda" and versions[newest].contract.fp32_source and not explicit else None
            if note == self._gpu_notes.get(name):
                continue
            self._gpu_notes[name] = note
            if note is None:
                continue
            if source:
                log.info("model %s: requests naming no version get v%s (fp32), not v%s: v%s is its int8 graph, made for CPUs, and this server runs on CUDA",
                         name, source, newest, newest, extra={"model": name, "version": source})  # fmt: skip
            else:
                log.warning("model %s v%s is an int8 graph made for CPUs and this server runs on CUDA; the fp32 version it was quantised from is not served "
                            "(%s): requests naming no version get the int8 graph", name, newest, self._fp32_source_whereabouts(name, versions[newest].contract),
                            extra={"model": name, "version": newest})  # fmt: skip

    def _fp32_source_whereabouts(self, name: str, contract: ModelContract) -> str:
        """Where the fp32 source of an int8 contract is, for a warning: an unserved folder and the flag to serve it, or nowhere."""
        for version, folder in self._known.get(name, []):
            try:
                candidate = read_contract(folder, verify=False)
            except ContractError:
                continue
            if candidate.files.get(ONNX_FILE) == contract.fp32_source:
                newer = sum(1 for known, _ in self._known.get(name, []) if known >= version)
                return f"{folder} holds it: serve it too, e.g. --version-policy latest:{newer}"
        return f"no version under {self.root / name} has model.onnx sha256 {contract.fp32_source[:12]}…"

    def _unselected(self, name: str) -> list[str]:
        """Why a model has no loaded version when the version policy selects none of its versions."""
        policy = self.settings.version_policy
        versions = [version for version, _ in self._known.get(name, [])]
        if versions and not any(policy.wants(version) for version in versions):
            return [f"version policy {policy} selects none of its versions {', '.join(map(str, versions))}"]
        return []

    def statuses(self) -> list[VersionStatus]:
        """The state of every version folder, newest first per model."""
        result = []
        for name, versions in sorted(self._known.items()):
            current = self._models.get(name, {})
            for version, folder in versions:
                if version in current:
                    result.append(VersionStatus(name, version, "READY", contract=current[version].contract))
                elif (name, version) in self._failed:
                    result.append(VersionStatus(name, version, "UNAVAILABLE", self._failed[(name, version)][1]))
                elif not (folder / CONTRACT_FILE).exists():
                    result.append(VersionStatus(name, version, "INCOMPLETE", f"no {CONTRACT_FILE} yet"))
                else:
                    result.append(VersionStatus(name, version, "UNLOADED"))
        return result

    # ---- loading -------------------------------------------------------------------------
    async def reload(self) -> ReloadReport:
        """Rescan the root; load new versions before unloading old ones. Never raises for a bad model."""
        async with self._lock:
            report = ReloadReport()
            self._known = await asyncio.to_thread(scan, self.root)
            for name in sorted(set(self._known) | set(self._models)):
                await self._reload_model(name, [] if name in self._held else self._known.get(name, []), report)
            self._loaded_once = True
        await self._changed(report, "repository reloaded")
        self._warn_default_version()
        self._note_gpu_defaults()
        return report

    async def load_model(self, name: str) -> ReloadReport:
        """Load the versions of `name` the version policy selects (keeping those serving whose
        files are unchanged), and serve it again if it was unloaded on request. ModelNotFound for a name the
        repository does not hold; ModelNotReady, with the reasons, when no version loads."""
        async with self._lock:
            report = ReloadReport()
            self._known = await asyncio.to_thread(scan, self.root)
            if name not in self._known:
                raise ModelNotFound(f"model {quote(name)} is not in the repository {self.root}")
            self._held.discard(name)
            await self._reload_model(name, self._known[name], report)
        await self._changed(report, f"model {name} load requested")
        if name == self.default_name:
            self._warn_default_version()
        self._note_gpu_defaults()
        if name not in self._models:
            errors = [f"v{v}: {e}" for n, v, e in report.failed if n == name] or self._unselected(name) or ["no version has a model.json yet"]
            raise ModelNotReady(f"model {name!r} did not load ({'; '.join(errors)})")
        return report

    async def unload_model(self, name: str) -> ReloadReport:
        """Stop serving `name` once its requests in flight finish, until `load_model(name)`.
        ModelNotFound for a name the repository neither holds nor serves."""
        async with self._lock:
            if name not in self._known and name not in self._models:
                raise ModelNotFound(f"model {quote(name)} is not in the repository {self.root}")
            report = ReloadReport()
            self._held.add(name)
            await self._reload_model(name, [], report)
        await self._changed(report, f"model {name} unload requested")
        return report

    async def _changed(self, report: ReloadReport, message: str) -> None:
        if self.on_change is not None:
            changed = self.on_change(self)
            if inspect.isawaitable(changed):
                await changed
        if report.loaded or report.unloaded or report.failed:
            log.info(message, extra={"loaded": report.loaded, "unloaded": report.unloaded, "failed": report.failed})

    async def _reload_model(self, name: str, versions: list[tuple[int, Path]], report: ReloadReport) -> None:
        """Serve the versions of `name` the policy selects from `versions` (newest first): each is
        kept if it serves with unchanged files, else loaded and warmed; only then do requests move to
        the new set, and versions leaving it are unloaded once their in-flight requests finish."""
        policy = self.settings.version_policy
        current = self._models.get(name, {})
        chosen: dict[int, LoadedModel] = {}
        for version, folder in versions:
            if policy.enough(len(chosen)):
                break
            if not policy.wants(version) or not (folder / CONTRACT_FILE).exists():
                continue  # not selected, or an export still writing this version
            sig = await asyncio.to_thread(signature, folder)
            serving = current.get(version)
            if serving is not None and serving.signature == sig:
                chosen[version] = serving
                continue
            failed = self._failed.get((name, version))
            if failed is not None and failed[0] == sig:
                continue  # already known broken, unchanged since
            try:
                model = await self._load(folder, sig)
            except Exception as error:  # noqa: BLE001 - any failure leaves the other versions serving
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                self._failed[(name, version)] = (sig, message)
                self.metrics.load_failure.labels(name, str(version)).inc()
                report.failed.append((name, version, message))
                log.error("model %s v%s failed to load: %s", name, version, message, extra={"model": name, "version": version})
                continue
            self._failed.pop((name, version), None)
            report.loaded.append((name, version))
            log.info("model %s v%s loaded", name, version, extra={"model": name, "version": version, "backend": model.backend.name})
            chosen[version] = model
        if chosen == current:  # the same LoadedModel objects (identity)
            return
        if chosen:
            self._models[name] = chosen
        else:
            self._models.pop(name, None)
        for version, model in chosen.items():
            if current.get(version) is not model:
                self.metrics.model_ready.labels(name, str(version)).set(1)
        retired = [model for version, model in current.items() if chosen.get(version) is not model]
        for model in retired:
            report.unloaded.append(model.key)
            if model.contract.version not in chosen:
                self.metrics.model_ready.labels(name, str(model.contract.version)).set(0)
        await asyncio.gather(*(model.unload() for model in retired))
        for model in retired:
            log.info("model %s v%s unloaded", *model.key, extra={"model": name, "version": model.contract.version})

    async def _load(self, folder: Path, sig: tuple) -> LoadedModel:
        contract, backend, bulk_backend = await asyncio.to_thread(self._load_sync, folder)
        batching = contract.batching
        s = self.settings
        labels = (contract.name, str(contract.version))
        batcher = Batcher(
            backend.run,
            max_batch_size=s.max_batch_size or batching.max_batch_size,
            max_queue_delay_ms=batching.max_queue_delay_ms if s.max_queue_delay_ms is None else s.max_queue_delay_ms,
            max_queue_size=s.max_queue_size or batching.max_queue_size,
            max_inflight=s.max_inflight_batches,
            metrics=self.metrics,
            labels=labels,
            bulk_run=bulk_backend.run if bulk_backend is not None else None,
        )
        return LoadedModel(contract, folder, backend, batcher, sig, bulk_backend)

    def _load_sync(self, folder: Path) -> tuple[ModelContract, Backend, Backend | None]:
        """Read and verify the contract, open the engine and warm it, and the bulk lane's engine
        where there is one (runs on a thread)."""
        contract = read_contract(folder, verify=True)
        check_folder(folder, contract)
        backend = load_backend(folder, contract, self.settings.backend, self.settings.device, self.settings.intra_op_threads)
        max_batch_size = self.settings.max_batch_size or contract.batching.max_batch_size
        warm(backend, contract, max_batch_size)
        bulk_backend = None
        if self.settings.bulk_lane and backend.name == OnnxRuntimeBackend.name and backend.device == "cpu":
            # One intra-op thread (the bulk lane's own low-priority thread does all the work) and no
            # memory arena (its small batches allocate little; an arena would keep it for good).
            bulk_backend = OnnxRuntimeBackend(folder / ONNX_FILE, device="cpu", intra_op_threads=1, memory_arena=False,
                                              config_entries=backend.config_entries)  # fmt: skip
            warm(bulk_backend, contract, max(1, max_batch_size // BULK_PIECE_DIVISOR))
        return contract, backend, bulk_backend

    # ---- polling and shutdown ------------------------------------------------------------
    def start_polling(self, seconds: float) -> None:
        if seconds > 0 and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll(seconds), name="repository-poll")

    async def _poll(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.reload()
            except Exception:  # noqa: BLE001 - keep polling whatever happened
                log.exception("repository poll failed")

    async def close(self) -> None:
        """Stop polling and unload every model once its requests finish."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        async with self._lock:
            models, self._models = [model for versions in self._models.values() for model in versions.values()], {}
            await asyncio.gather(*(model.unload() for model in models))


def gpu_fp32_source(versions: dict[int, LoadedModel], version: int) -> int:
    """The served fp32 version that int8 `version` was quantised from, when `version` runs on CUDA
    (an int8 graph is made for CPUs; on a GPU its fp32 source is faster and exact); 0 otherwise."""
    model = versions.get(version)
    if model is None or model.backend.device != "cuda" or not model.contract.fp32_source:
        return 0
    sources = [v for v, m in versions.items() if m.contract.precision == "fp32" and m.contract.files.get(ONNX_FILE) == model.contract.fp32_source]
    return max(sources, default=0)


def warm(backend: Backend, contract: ModelContract, max_batch_size: int) -> None:
    """Run the engine at batch 1 and the largest batch; check output shapes against the contract."""
    from core.errors import ContractError

    for batch in sorted({1, max_batch_size}):
        outputs = backend.run(np.zeros((batch, *contract.input_shape), np.uint8))
        for name, shape in contract.output_shapes(batch).items():
            if tuple(outputs[name].shape) != shape:
                raise ContractError(f"{contract.name} v{contract.version}: output {name} has shape {list(outputs[name].shape)}, model.json implies {list(shape)}")
