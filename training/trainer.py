"""Training: plain functions in the style of torchvision's classification reference.

`fit(config)` runs a whole training: data, model, SGD + StepLR (the paper's recipe), one guidance
method per step (`training.guidance`), validation AUC after every epoch, RUN_DIR/last.pt every
epoch, RUN_DIR/best.pt when the validation AUC improves (never test data), RUN_DIR/metrics.jsonl
one line per epoch. With `ema_decay` the weights validated and kept are an exponential moving
average of the trained ones (timm's ModelEmaV3; the raw weights' AUC is logged beside). `resume=True`
continues the run from last.pt and ends with the same weights as an uninterrupted run. Under
torchrun it trains data-parallel (training.distributed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

from core.contract import CLASS_NAMES, NUM_CLASSES
from core.errors import UserError
from core.images import spread
from training import distributed
from training.checkpoint import Checkpoint, ValPredictions, read_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.distributed import DistInfo, unwrap
from training.guidance import GuidanceMethod, StepResult, get_method
from training.model import CamClassifier, cam_grid, create_classifier, default_image_size

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3
    from training.data import FaceDataset

log = logging.getLogger(__name__)

LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"
# Settings a resumed run may change; any other change is reported (the run is then not the same run).
RESUMABLE_CHANGES = ("epochs", "workers", "device", "out", "skip_unreadable", "data", "csv", "heatmaps")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the run stopped and last.pt holds the last good epoch."""


@dataclasses.dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    norm_images: Dataset | None  # --precise-bn's training images, prepared as validation prepares images
    saliency: str  # "human" | "proxy" | "none"
    summary: dict[str, Any]
    val_paths: list[str]
    val_sources: list[str]


# ---------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: derive numpy and random seeds from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_data(config: TrainConfig, image_size: int, grid: tuple[int, int]) -> DataBundle:
    """Train and validation datasets (validation: the data's own, else a seeded hold-out of train)."""
    from training.augment import make_augmenter
    from training.data import FaceDataset, decode_all, discover, saliency_provenance, split_samples, summarise

    samples = discover(config.data, config.csv, config.heatmaps)
    splits = split_samples(samples, config.val_fraction, config.seed)
    for name in ("train", "val"):
        missing = [CLASS_NAMES[label] for label in range(NUM_CLASSES) if label not in {s.label for s in splits[name]}]
        if missing:
            raise UserError(
                f"{config.data}: the {name} split has no {' or '.join(missing)} images ({len(splits[name])} images); "
                "training needs both classes (give several DATA folders to combine sources of each class)"
            )
    scale = config.scale or image_size
    prepared = dict(image_size=image_size, cam_grid=grid, skip_unreadable=config.skip_unreadable, scale=scale, seed=config.seed)
    augmenter = make_augmenter(config)
    teacher_view = config.distill_view == "clean"  # TrainConfig.validate: only with --teacher and augmentation
    train = decode_all(FaceDataset(splits["train"], train=True, augmenter=augmenter, teacher_view=teacher_view, **prepared),
                       config.workers, config.skip_unreadable)  # fmt: skip
    val = decode_all(FaceDataset(splits["val"], **prepared), config.workers, config.skip_unreadable)
    saliency = saliency_provenance(train.samples)
    summary = {
        "root": config.data,
        "csv": config.csv,
        "heatmaps": config.heatmaps,
        "counts": summarise([*train.samples, *val.samples]),
        "with_maps": {"train": sum(s.map_path is not None for s in train.samples), "val": sum(s.map_path is not None for s in val.samples)},
        "sources": sorted({s.source for s in [*train.samples, *val.samples]}),
    }
    return DataBundle(
        train=train,
        val=val,
        norm_images=norm_statistics_images(train, config) if config.precise_bn else None,
        saliency=saliency,
        summary=summary,
        val_paths=[str(s.path) for s in val.samples],
        val_sources=[s.source for s in val.samples],
    )


def norm_statistics_images(train: FaceDataset, config: TrainConfig) -> Dataset:
    """--precise-bn's images: `precise_bn` training images evenly spread, prepared as validation prepares
    them, except a seeded `precise_bn_changed` share of them that goes through the training augmentation
    (changed first, then clean; the same images at every validation)."""
    chosen = spread(train.samples, config.precise_bn)
    changed = round(config.precise_bn_changed * len(chosen))
    if not changed:
        return train.rebuilt(chosen, train=False)
    order = random.Random(f"{config.seed}:precise-bn").sample(range(len(chosen)), len(chosen))
    augmented = train.rebuilt([chosen[i] for i in order[:changed]], train=True, teacher_view=False)
    rest = [chosen[i] for i in order[changed:]]
    return ConcatDataset([augmented, train.rebuilt(rest, train=False)]) if rest else augmented


def build_model(config: TrainConfig, pretrained: bool = True) -> CamClassifier:
    try:
        model = create_classifier(config.arch)
    except ValueError as error:
        raise UserError(f"--arch {config.arch}: {error}") from error
    if pretrained and config.weights != "none":
        from training.weights import load_pretrained

        log.info("weights: %s", load_pretrained(model, config.arch, config.weights))
    return model


def set_train_mode(model: torch.nn.Module, config: TrainConfig) -> None:
    """model.train(), with every BatchNorm layer back in eval mode when config.freeze_bn: the layers then
    normalise with their running (pretrained) statistics and never update them; their affine weights still learn."""
    model.train()
    if getattr(config, "freeze_bn", False):
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def build_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)


def build_ema(config: TrainConfig, model: torch.nn.Module) -> ModelEmaV3 | None:
    """A moving average of `model`'s weights and buffers (config.ema_decay per step at most, warmed up from 0 over
    the first steps as timm does, so early epochs are not held back by the initial weights), or None when off."""
    if not config.ema_decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=config.ema_decay, use_warmup=True)


def train_loader(dataset: Dataset, config: TrainConfig, info: DistInfo) -> DataLoader:
    """Shuffled batches whose order depends only on (seed, epoch): see `start_epoch`."""
    if info.distributed:
        sampler = DistributedSampler(dataset, info.world_size, info.rank, shuffle=True, seed=config.seed)
    else:  # its own generator: persistent workers draw their base seed from the loader's only once
        sampler = RandomSampler(dataset, generator=torch.Generator())
    from training.data import EpochSampler

    sampler = EpochSampler(sampler, len(dataset))
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.workers,
        pin_memory=info.device.type == "cuda",
        worker_init_fn=seed_worker,
        generator=torch.Generator(),
        persistent_workers=config.workers > 0,
    )


def start_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Fix this epoch's shuffle and worker seeds, so a resumed run sees the same batches."""
    loader.sampler.set_epoch(epoch)  # EpochSampler: the epoch of every item (random crops, augmentation)
    if not isinstance(loader.sampler.sampler, DistributedSampler):
        loader.sampler.sampler.generator.manual_seed(seed * 1_000_003 + epoch)
    loader.generator.manual_seed(seed * 1_000_003 + epoch)


# ---------------------------------------------------------------- one epoch


def autocast(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA when enabled; nothing on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool) -> dict[str, torch.Tensor]:
    moved = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    if channels_last:
        for key in ("image", "teacher_image"):
            if key in moved:
                moved[key] = moved[key].contiguous(memory_format=torch.channels_last)
    return moved


def forward_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], method: GuidanceMethod, config: TrainConfig,
                 device: torch.device) -> StepResult:
    """The forward half of a training step: the guidance method's loss, under autocast where enabled."""
    with autocast(device, config.amp):
        return method(model, batch, config)


def backward_step(result: StepResult, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """The backward half: gradients of `result.loss` (scaled for fp16) and one optimiser step.

    Every training loop (the trainer's, the guidance and step-time benchmarks') runs forward_step,
    its own check of the loss, then backward_step.
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(result.loss).backward()
    scaler.step(optimizer)
    scaler.update()


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    info: DistInfo,
    epoch: int,
    progress: bool = True,
    teacher: torch.nn.Module | None = None,
    ema: ModelEmaV3 | None = None,
) -> dict[str, float]:
    """One pass over `loader` (updating `ema` after each step); returns mean loss, ce, guidance term, the
    teacher term (with a teacher), accuracy and images/s (all ranks)."""
    from tqdm import tqdm

    method = get_method(config.guidance)
    if teacher is not None:
        from training.distill import with_teacher

        method = with_teacher(method, teacher, config.distill_weight, config.distill_temperature)
    set_train_mode(model, config)
    sums = {"loss": 0.0, "ce": 0.0, "guidance": 0.0, "distill": 0.0, "correct": 0.0, "count": 0.0}
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (progress and info.is_main), leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    for step, batch in enumerate(bar):
        batch = to_device(batch, info.device, config.channels_last)
        result = forward_step(model, batch, method, config, info.device)
        if not distributed.all_finite(result.loss, info):
            raise TrainingDiverged(
                f"epoch {epoch + 1}, step {step + 1}: the loss became NaN or infinite ({result.loss.item()} on rank {info.rank})"
            )
        backward_step(result, optimizer, scaler)
        if ema is not None:
            ema.update(unwrap(model), step=epoch * len(loader) + step + 1)
        n = batch["label"].numel()
        sums["loss"] += result.loss.detach().item() * n
        sums["ce"] += result.ce.detach().item() * n
        sums["guidance"] += float(result.guidance_term.detach()) * n
        if result.distillation is not None:
            sums["distill"] += result.distillation.detach().item() * n
        sums["correct"] += (result.logits.argmax(dim=1) == batch["label"]).sum().item()
        sums["count"] += n
        elapsed = time.perf_counter() - start
        bar.set_postfix(
            loss=f"{sums['loss'] / sums['count']:.4f}",
            acc=f"{sums['correct'] / sums['count']:.3f}",
            img_s=f"{sums['count'] * info.world_size / max(elapsed, 1e-9):.1f}",
        )
    bar.close()
    elapsed = time.perf_counter() - start
    sums = distributed.reduce_sums(sums, info)
    count = max(sums["count"], 1.0)
    stats = {key: sums[key] / count for key in ("loss", "ce", "guidance", "distill")}
    if teacher is None:
        del stats["distill"]
    return {**stats, "accuracy": sums["correct"] / count, "images_per_s": sums["count"] / max(elapsed, 1e-9)}


def precise_norm_statistics(models: list[torch.nn.Module], images: Dataset, config: TrainConfig, info: DistInfo) -> None:
    """Every BatchNorm of `models` given statistics measured afresh on `images` (cumulative averages,
    `torch.optim.swa_utils.update_bn`), instead of the running averages over the augmented training
    batches: a network validated and exported on clean images then normalises them with clean
    statistics. Every rank measures the same images, so the ranks agree without communication."""
    from torch.optim.swa_utils import update_bn

    loader = DataLoader(images, batch_size=config.batch_size, shuffle=False, num_workers=config.workers)
    for model in models:
        update_bn((batch["image"] for batch in loader), unwrap(model), device=info.device)


def validate(model: torch.nn.Module, dataset: Dataset, config: TrainConfig, info: DistInfo) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metrics and predictions on the validation set; each rank scores a shard, rank order restored."""
    from training.evaluate import predict, validation_metrics

    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    part = predict(unwrap(model), shard, batch_size=config.batch_size, device=info.device, workers=config.workers) if len(shard) else None
    parts = [p for p in distributed.gather_objects(part, info) if p is not None]
    merged = {key: np.concatenate([p[key] for p in parts]) for key in ("indices", "labels", "scores")}
    order = np.argsort(merged["indices"], kind="stable")
    predictions = {key: value[order] for key, value in merged.items()}
    sources = [dataset.samples[int(i)].source for i in predictions["indices"]]
    return validation_metrics(predictions["labels"], predictions["scores"], sources), predictions


# ---------------------------------------------------------------- the run


class MetricsLog:
    """RUN_DIR/metrics.jsonl (one JSON object per epoch) plus TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, history: list[dict[str, Any]]):
        self.path = run_dir / METRICS
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--out {run_dir}: cannot create the run folder ({error.strerror})") from error
        self.path.write_text("".join(json.dumps(row) + "\n" for row in history))  # a resumed run drops stray lines
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.writer = None

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def check_resumable(config: TrainConfig, state: Checkpoint, path: Path) -> None:
    saved = state.config
    changed = [
        f"{field.name} {getattr(saved, field.name)!r} -> {getattr(config, field.name)!r}"
        for field in dataclasses.fields(TrainConfig)
        if field.name not in RESUMABLE_CHANGES and getattr(saved, field.name) != getattr(config, field.name)
    ]
    if changed:
        raise UserError(f"--resume: {path} was trained with other settings ({'; '.join(changed)}); use the same settings or a new --out")
    if state.epoch >= config.epochs:
        raise UserError(f"--resume: {path} already completed {state.epoch} of {config.epochs} epochs (raise --epochs to train longer)")


def fit(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train according to `config`; returns a summary (best epoch, its validation metrics, files)."""
    config.validate()
    if not config.out:
        raise UserError("--out RUN_DIR is required")
    info = distributed.init_distributed_mode(config.device)
    try:
        return _fit(config, resume, progress, info)
    finally:
        distributed.cleanup(info)


@dataclasses.dataclass
class Run:
    """Everything one training run holds between epochs."""

    config: TrainConfig
    info: DistInfo
    model: CamClassifier  # unwrapped
    data: DataBundle
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    image_size: int
    grid: tuple[int, int]
    teacher: torch.nn.Module | None = None  # config.teacher's network (training.distill), frozen
    ema: ModelEmaV3 | None = None  # config.ema_decay's average of `model`: validated and kept in its place
    start: int = 0
    best: dict[str, Any] = dataclasses.field(default_factory=lambda: {"epoch": None, "val_auc": None})
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _fit(config: TrainConfig, resume: bool, progress: bool, info: DistInfo) -> dict[str, Any]:
    run_dir = Path(config.out)
    last_path, best_path = run_dir / LAST, run_dir / BEST
    run = setup_run(config, info, resumed_from(config, resume, last_path))
    ddp_model = distributed.wrap_model(run.model, info)
    loader = train_loader(run.data.train, config, info)
    metrics_log = MetricsLog(run_dir, run.history) if info.is_main else None
    hint = distributed.cpu_allocator_hint() if info.device.type == "cpu" else None
    if hint and info.is_main:
        log.warning(hint)
    if info.is_main:
        log.info(
            "training %s (%s guidance, alpha %s, %s maps) on %d images, validating on %d; %s px, CAM %dx%d, device %s x%d",
            config.arch, config.guidance, config.alpha, run.data.saliency, len(run.data.train), len(run.data.val),
            run.image_size, run.grid[0], run.grid[1], info.device, info.world_size,
        )  # fmt: skip
    try:
        for epoch in range(run.start, config.epochs):
            start_epoch(loader, config.seed, epoch)
            lr = run.optimizer.param_groups[0]["lr"]
            try:
                train_stats = train_one_epoch(ddp_model, loader, run.optimizer, run.scaler, config, info, epoch, progress, run.teacher, run.ema)
            except TrainingDiverged as error:
                kept = f"{last_path} keeps epoch {epoch}, the last good weights" if epoch else "no checkpoint was written"
                raise TrainingDiverged(f"{error}; training stopped, {kept} (try a lower --lr, or check the data and maps)") from None
            run.scheduler.step()
            distributed.sync_buffers(run.model, info)
            if run.ema is not None:  # averaged from each rank's own running statistics: validate and keep rank 0's
                distributed.sync_buffers(run.ema.module, info)
            if run.data.norm_images is not None:
                precise_norm_statistics([run.model] + ([run.ema.module] if run.ema is not None else []), run.data.norm_images, config, info)
            val_metrics, predictions = validate(kept_model(run, ddp_model), run.data.val, config, info)
            raw_auc = validate(ddp_model, run.data.val, config, info)[0]["auc"] if run.ema is not None else None
            improved = record_epoch(run, epoch, lr, train_stats, val_metrics, raw_auc)
            if info.is_main:
                checkpoint = make_checkpoint(run, epoch, val_metrics, predictions)
                save_checkpoint(checkpoint, last_path)
                if improved:
                    save_checkpoint(checkpoint, best_path)
                metrics_log.write(run.history[-1])
                log_epoch(config, epoch, train_stats, val_metrics, improved, raw_auc)
            distributed.barrier(info)
    finally:
        if metrics_log is not None:
            metrics_log.close()
    return {
        "best_epoch": run.best["epoch"],
        "best_val_auc": run.best["val_auc"],
        "epochs": config.epochs,
        "saliency": run.data.saliency,
        "files": [str(last_path), str(best_path), str(run_dir / METRICS)],
        "history": run.history,
        "model": run.model,  # the trained model (last epoch), for callers in the same process
        "average": run.ema.module if run.ema is not None else None,  # --ema-decay's average (last epoch)
    }


def kept_model(run: Run, trained: torch.nn.Module) -> torch.nn.Module:
    """The weights a run validates and saves as its model: the moving average with --ema-decay, else `trained`."""
    return run.ema.module if run.ema is not None else trained


def resumed_from(config: TrainConfig, resume: bool, last_path: Path) -> Checkpoint | None:
    """The checkpoint --resume continues (checked against `config`), or None for a new run."""
    if resume:
        state = read_checkpoint(last_path)
        check_resumable(config, state, last_path)
        return state
    if last_path.exists():
        raise UserError(f"--out {last_path.parent}: already holds {LAST}; pass --resume to continue that run, or choose a new --out")
    return None


def setup_run(config: TrainConfig, info: DistInfo, state: Checkpoint | None) -> Run:
    """Model, data and optimisation state for a new run, or restored from `state`."""
    seed_everything(config.seed)
    model = build_model(config, pretrained=state is None)
    image_size = config.image_size or default_image_size(config.arch)
    grid = cam_grid(model, image_size)
    data = load_data(config, image_size, grid)
    model.to(info.device)
    if config.channels_last:  # about 2x faster on CPU too (docs/benchmarks.md, training step time)
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model)
    teacher = None
    if config.teacher:
        from training.distill import load_teacher

        teacher = load_teacher(config.teacher, image_size, config.scale or image_size, info.device)
        if config.channels_last:
            teacher.to(memory_format=torch.channels_last)
    run = Run(config=config, info=info, model=model, data=data, optimizer=optimizer, scheduler=build_scheduler(config, optimizer),
              scaler=torch.amp.GradScaler("cuda", enabled=info.device.type == "cuda" and config.amp), image_size=image_size, grid=grid,
              teacher=teacher, ema=build_ema(config, model))  # fmt: skip
    if state is not None:
        model.load_state_dict(state.model if state.training_model is None else state.training_model)
        if run.ema is not None:
            run.ema.module.load_state_dict(state.model)
        run.optimizer.load_state_dict(state.optimizer)
        run.scheduler.load_state_dict(state.scheduler)
        run.scaler.load_state_dict(state.scaler)
        run.start, run.best, run.history = state.epoch, dict(state.best), list(state.history)
        set_rng_state(state.rng)
        log.info("resuming %s at epoch %d of %d", Path(config.out) / LAST, run.start + 1, config.epochs)
    return run


def record_epoch(run: Run, epoch: int, lr: float, train_stats: dict[str, float], val_metrics: dict[str, Any], raw_auc: float | None = None) -> bool:
    """Update the best epoch (by validation AUC of the kept weights) and the history (with --ema-decay, the raw
    weights' AUC too); whether this epoch is the best so far."""
    auc = val_metrics["auc"]
    improved = run.best["epoch"] is None or (auc is not None and (run.best["val_auc"] is None or auc > run.best["val_auc"]))
    if improved:
        run.best = {"epoch": epoch + 1, "val_auc": auc}
    run.history.append({
        "epoch": epoch + 1,
        "lr": lr,
        **{f"train_{key}": value for key, value in train_stats.items()},
        **{f"val_{key}": val_metrics.get(key) for key in ("auc", "auc_ci", "eer", "accuracy", "source_auc")},
        **({"val_auc_raw": raw_auc} if run.ema is not None else {}),
        "best_epoch": run.best["epoch"],
        "saliency": run.data.saliency,
    })  # fmt: skip
    return improved


def make_checkpoint(run: Run, epoch: int, val_metrics: dict[str, Any], predictions: dict[str, np.ndarray]) -> Checkpoint:
    """The checkpoint after `epoch`: the unwrapped model, the optimisation state and the validation results."""
    data, order = run.data, predictions["indices"]
    return Checkpoint(
        config=run.config,
        model=kept_model(run, run.model).state_dict(),
        training_model=run.model.state_dict() if run.ema is not None else None,
        mean=tuple((run.model.pixel_mean.flatten() / 255.0).tolist()),
        std=tuple((run.model.pixel_std.flatten() / 255.0).tolist()),
        image_size=run.image_size,
        scale=run.config.scale or run.image_size,
        cam_grid=tuple(run.grid),
        saliency=data.saliency,
        data=data.summary,
        epoch=epoch + 1,
        optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(),
        scaler=run.scaler.state_dict(),
        best=dict(run.best),
        val_metrics=val_metrics,
        val_predictions=ValPredictions(
            paths=[data.val_paths[i] for i in order],
            labels=predictions["labels"].tolist(),
            scores=predictions["scores"].tolist(),
            sources=[data.val_sources[i] for i in order],
        ),
        history=list(run.history),
        rng=rng_state(),
    )


def log_epoch(config: TrainConfig, epoch: int, train_stats: dict[str, float], val_metrics: dict[str, Any], improved: bool,
              raw_auc: float | None = None) -> None:  # fmt: skip
    log.info(
        "epoch %d/%d: loss %.4f (ce %.4f, guidance %.4f%s), train acc %.3f, %.1f img/s; val AUC %s%s%s, acc %.3f%s%s",
        epoch + 1, config.epochs, train_stats["loss"], train_stats["ce"], train_stats["guidance"],
        f", teacher {train_stats['distill']:.4f}" if "distill" in train_stats else "",
        train_stats["accuracy"], train_stats["images_per_s"], _fmt(val_metrics["auc"]),
        " [{:.3f}, {:.3f}]".format(*val_metrics["auc_ci"]) if val_metrics.get("auc_ci") else "",
        f" (average; raw weights {_fmt(raw_auc)})" if config.ema_decay else "", val_metrics["accuracy"],
        "".join(f"; {source} {_fmt(auc)}" for source, auc in val_metrics["source_auc"].items()) if len(val_metrics["source_auc"]) > 2 else "",
        " (best)" if improved else "",
    )  # fmt: skip


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
