"""A published fp32 version → training checkpoints again: one per network, plus their ensemble.

`cyborg checkpoint models/NAME/9 --out DIR` reads the networks back out of version 9's model.onnx,
so a version whose checkpoints are gone (or that came from someone else's repository) can be
fine-tuned (`cyborg train --weights DIR/member-0.pt`), taught from (`--teacher
DIR/ensemble.pt`), averaged with new members (`cyborg ensemble DIR/member-0.pt ... new.pt`),
evaluated and exported like any checkpoint.

The exporter names each weight after the network's parameter (`model.members.0.backbone.conv_stem.weight`)
and folds a BatchNorm that follows a convolution into it (the convolution gains a bias; the norm's
own parameters leave the graph). Such a convolution comes back with the folded weight, and its
BatchNorm as the identity plus that bias (weight 1, running mean 0, running variance 1 - eps): the
same function in eval mode. Where the version's validation images are at hand, the norms then get
statistics back (`restore_norm_statistics`), so the networks also train in train mode as ordinary
ones do; without them, fine-tune with `--freeze-bn` (the checkpoints record which). Every rebuilt network is checked against the graph
on images (`MAX_LOGIT_DIFFERENCE`) before anything is written. The validation split is re-drawn
from the data folders model.json records (`training.requantize.validation_split`), and each
checkpoint records its own scores of it, so export can calibrate and ensemble can validate; where
those folders are not at hand (a user of the shipped model) the checkpoints are written without
scores, with a warning: they fine-tune and teach, but do not export or ensemble as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core import contract as c
from core.errors import UserError
from training.checkpoint import Checkpoint, ValPredictions, save_checkpoint
from training.config import TrainConfig
from training.model import CamClassifier, EnsembleCamClassifier, create_classifier

log = logging.getLogger(__name__)

MAX_LOGIT_DIFFERENCE = 1e-3  # rebuilt network against model.onnx on the check images
NORM_IMAGES = 256  # validation images the folded BatchNorms' statistics are measured on


def member_architectures(source: c.ModelContract) -> list[str]:
    """The architecture of each network in the version: its ensemble's members in order (model.json's
    `training.ensemble`), or the one network's."""
    members = source.training.get("ensemble") or []
    return [member["arch"] for member in members] if members else [source.architecture]


def graph_weights(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The graph's initializers by name, and each convolution's weight name -> its bias input's name."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    biases = {node.input[1]: node.input[2] for node in graph.node if node.op_type == "Conv" and len(node.input) > 2 and node.input[2]}
    return {t.name: numpy_helper.to_array(t).copy() for t in graph.initializer}, biases


def norm_after(modules: list[tuple[str, nn.Module]], position: int) -> tuple[str, nn.Module] | None:
    """The BatchNorm between the convolution at `position` and the next convolution, if any."""
    for name, module in modules[position + 1 :]:
        if isinstance(module, nn.Conv2d):
            return None
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return name, module
    return None


def rebuild_network(arch: str, source: c.ModelContract, graph: tuple[dict[str, np.ndarray], dict[str, str]], prefix: str,
                    where: str) -> tuple[CamClassifier, list[tuple[str, nn.Conv2d, nn.Module]]]:  # fmt: skip
    """`arch` with the graph's weights under `prefix`, folded BatchNorms restored as identity + the folded
    bias; and those (convolution's name, convolution, norm)."""
    weights, biases = graph
    network = create_classifier(arch, tuple(source.mean), tuple(source.std))
    modules = list(network.named_modules())
    folded: dict[str, tuple[str, nn.Conv2d, nn.Module]] = {}  # norm name -> (its convolution's name, it, the norm)
    with torch.no_grad():
        for position, (name, module) in enumerate(modules):
            if not name or name in folded:
                continue
            pair = norm_after(modules, position) if isinstance(module, nn.Conv2d) else None
            if pair is not None and f"{prefix}{pair[0]}.weight" not in weights:  # the exporter folded it into this convolution
                norm_name, norm = pair
                weight = f"{prefix}{name}.weight"
                if weight not in weights:
                    raise UserError(f"{where}: no weight {weight} in the graph: model.onnx was not exported from a {arch} by `cyborg export`")
                module.weight.copy_(torch.from_numpy(weights[weight]))
                bias = weights.get(biases.get(weight, ""))
                norm.weight.fill_(1.0)
                norm.bias.copy_(torch.from_numpy(bias) if bias is not None else torch.zeros_like(norm.bias))
                norm.running_mean.zero_()
                norm.running_var.fill_(1.0 - norm.eps)
                folded[norm_name] = (name, module, norm)
                continue
            for key, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                stored = weights.get(f"{prefix}{name}.{key}")
                if stored is not None and tuple(stored.shape) == tuple(tensor.shape):
                    tensor.copy_(torch.from_numpy(stored))
                elif tensor.dtype.is_floating_point:
                    raise UserError(f"{where}: no weight {prefix}{name}.{key} {tuple(tensor.shape)} in the graph: model.onnx "
                                    f"was not exported from a {arch} by `cyborg export`")  # fmt: skip
    return network.eval(), list(folded.values())


def imagenet_channel_norms(arch: str) -> dict[str, torch.Tensor]:
    """Each convolution's per-output-channel weight norm in `arch`'s packaged ImageNet weights, by its
    module name in a CamClassifier ("backbone.conv_stem"); empty for an architecture without them."""
    from training.weights import PACKAGED_WEIGHTS, packaged_imagenet_state_dict

    if arch not in PACKAGED_WEIGHTS:
        return {}
    try:
        state = packaged_imagenet_state_dict(arch)
    except UserError:
        return {}
    return {f"backbone.{key.removesuffix('.weight')}": value.flatten(1).norm(dim=1)
            for key, value in state.items() if key.endswith(".weight") and value.dim() == 4}  # fmt: skip


def channel_divisor(conv: nn.Conv2d, target: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """Per output channel, what to divide `conv`'s weights by: the factor that gives them `target`'s
    norms where both norms are above 0, else `fallback` (float64)."""
    fallback = fallback.double()
    if target is None or target.shape != fallback.shape:
        return fallback
    current = conv.weight.detach().double().flatten(1).norm(dim=1)
    usable = (target > 0) & (current > 0)
    return torch.where(usable, current / target.double().clamp_min(1e-12), fallback)


def divide_channels(conv: nn.Conv2d, divisor: torch.Tensor) -> None:
    """`conv`'s weights (and bias) divided per output channel."""
    conv.weight.div_(divisor.view(-1, *[1] * (conv.weight.dim() - 1)).to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.div_(divisor.to(conv.bias.dtype))


def resize_identity_norms(folded: list[tuple[str, nn.Conv2d, nn.Module]], reference: dict[str, torch.Tensor]) -> None:
    """Without images to measure statistics on: each folded convolution at its `reference` norms all the
    same, its identity norm's weight multiplied by the divisor, so the function is exactly the folded one
    and a `--freeze-bn` fine-tune steps on weights of the size they were trained at."""
    with torch.no_grad():
        for name, conv, norm in folded:
            divisor = channel_divisor(conv, reference.get(name), torch.ones(conv.out_channels, dtype=torch.float64))
            divide_channels(conv, divisor)
            norm.weight.mul_(divisor.to(norm.weight.dtype))


def restore_norm_statistics(network: CamClassifier, folded: list[tuple[str, nn.Conv2d, nn.Module]], images: np.ndarray,
                            reference: dict[str, torch.Tensor] | None = None, batch: int = 32) -> None:  # fmt: skip
    """Give each folded BatchNorm of `network` back statistics measured on `images`, keeping the function.

    A folded convolution computes z = W'x, its norm adds the folded bias b'. With z's per-channel
    mean m and variance v over the images and a per-channel divisor d: W' / d, running mean m / d,
    running variance v / d^2, weight d * sqrt(v / d^2 + eps), bias b' + m. In eval mode that is
    W'x + b' again; in train mode the norm sees batches like the ones it measured, so the network
    trains as a normally trained one does (no --freeze-bn needed). d gives each output channel of the
    convolution the norm `reference` holds for it (by the convolution's name: the network's weights
    before training, such as `imagenet_channel_norms`), so the weights are back at the size they were
    trained at: AdamW moves every weight by about the learning rate whatever its size, and a weight
    ten times too small would change ten times too fast. Without a reference, d = sqrt(v + eps)
    (unit-variance outputs)."""
    reference = reference or {}
    sums: list[list[torch.Tensor]] = [[] for _ in folded]  # per pair: [sum z, sum z^2, count] per channel, per batch

    def record(index: int):
        def hook(_module, inputs):
            z = inputs[0].double()
            sums[index].append(torch.stack([z.sum(dim=(0, 2, 3)), (z * z).sum(dim=(0, 2, 3)), torch.full_like(z[0, :, 0, 0], z[:, 0].numel())]))
        return hook

    handles = [norm.register_forward_pre_hook(record(index)) for index, (_, _, norm) in enumerate(folded)]
    with torch.no_grad():
        for start in range(0, len(images), batch):
            network(torch.from_numpy(images[start : start + batch]))
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        for (name, conv, norm), measured in zip(folded, sums):
            total, squares, count = torch.stack(measured).sum(dim=0)
            mean = total / count
            variance = (squares / count - mean * mean).clamp_min(0)
            scale = channel_divisor(conv, reference.get(name), torch.sqrt(variance + norm.eps))
            divide_channels(conv, scale)
            norm.running_mean.copy_(mean / scale)
            norm.running_var.copy_(variance / scale**2)
            norm.weight.copy_(scale * torch.sqrt(norm.running_var + norm.eps))
            norm.bias.add_(mean.to(norm.bias.dtype))


def check_against_graph(model: nn.Module, path: Path, images: np.ndarray, where: str) -> None:
    """UserError when `model`'s logits on `images` differ from the graph's at `path` beyond the limit."""
    from training.onnx_export import ort_session, run_onnx

    expected = run_onnx(ort_session(path), images)[c.LOGITS_OUTPUT]
    with torch.no_grad():
        found = model(torch.from_numpy(images)).logits.numpy()
    difference = float(np.abs(found - expected).max())
    if difference > MAX_LOGIT_DIFFERENCE:
        raise UserError(f"{where}: the rebuilt network differs from model.onnx by {difference:.3g} in the logits "
                        f"(limit {MAX_LOGIT_DIFFERENCE}): its graph cannot be mapped back to a checkpoint")  # fmt: skip


def version_checkpoint(model: CamClassifier | EnsembleCamClassifier, source: c.ModelContract, config: TrainConfig,
                       samples: list | None, ensemble: list | None = None) -> Checkpoint:  # fmt: skip
    """A checkpoint of `model`, with its own scores of the validation `samples` (what export and ensemble
    need), or with none when the version's validation images are not at hand (None)."""
    from training.evaluate import score_samples

    size, grid = source.input_height, tuple(source.cam_shape)
    metrics, scored = score_samples(model, samples, size, grid, source.scale or size) if samples is not None else ({}, ValPredictions())
    return Checkpoint(
        config=config,
        model=model.state_dict(),
        mean=tuple(source.mean),
        std=tuple(source.std),
        image_size=size,
        scale=source.scale or size,
        cam_grid=grid,
        epoch=int(source.training.get("epochs") or 0),
        best={"epoch": None, "val_auc": metrics.get("auc")},
        saliency=source.training.get("saliency"),
        data=source.training.get("data") or {},
        val_metrics=metrics,
        val_predictions=scored,
        ensemble=ensemble,
    )


def checkpoints_from_version(folder: Path, out: Path, data: list[str] | None = None, check_images: int = 8) -> list[Path]:
    """Write OUT/network.pt for a one-network fp32 version at `folder`, or OUT/member-K.pt for each
    network of an ensemble and OUT/ensemble.pt for their average; return the files written."""
    from training.requantize import validation_split, warn_if_split_differs

    source = c.read_contract(folder, verify=True)
    where = f"{folder} ({source.name} v{source.version})"
    if source.precision != "fp32":
        raise UserError(f"{where}: an {source.precision} graph's weights are quantised; rebuild from its fp32 source "
                        f"(training.quantised_from: {source.training.get('quantised_from', {}).get('version', '?')})")  # fmt: skip
    try:
        samples = validation_split(source, data)
    except UserError as error:
        if data:
            raise
        log.warning("%s. The checkpoints carry no validation scores: they fine-tune and teach, but `cyborg export` "
                    "and `cyborg ensemble` need the version's validation images (--data)", error)  # fmt: skip
        samples = None
    archs = member_architectures(source)
    graph = graph_weights(folder / c.ONNX_FILE)
    prefixes = [f"model.members.{k}." for k in range(len(archs))] if len(archs) > 1 else ["model."]
    rebuilt = [rebuild_network(arch, source, graph, prefix, where) for arch, prefix in zip(archs, prefixes)]
    networks = [network for network, _ in rebuilt]
    sizes = {arch: imagenet_channel_norms(arch) for arch in set(archs)}  # the convolutions' trained size, read once per architecture
    if samples is not None:  # statistics for the folded norms, so the networks train without --freeze-bn
        from core.images import load_images, spread

        images = load_images(spread([str(sample.path) for sample in samples], NORM_IMAGES), source.input_height,
                             source.input_width, source.scale or source.input_height)  # fmt: skip
        for arch, (network, folded) in zip(archs, rebuilt):
            restore_norm_statistics(network, folded, images, reference=sizes[arch])
    else:  # identity norms stay (no statistics); the convolutions still come back at their trained size
        for arch, (_, folded) in zip(archs, rebuilt):
            resize_identity_norms(folded, sizes[arch])
    model = EnsembleCamClassifier(networks).eval() if len(networks) > 1 else networks[0]
    rng = np.random.default_rng(0)
    check_against_graph(model, folder / c.ONNX_FILE, rng.integers(0, 256, (check_images, *source.input_shape), dtype=np.uint8), where)
    records = source.training.get("ensemble") or [{}]  # an ensemble's member records (seed, ...) in order
    base = {key: source.training[key] for key in ("guidance", "alpha", "cam_class", "val_fraction", "seed") if key in source.training}
    data_roots = (source.training.get("data") or {}).get("root")
    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, Checkpoint]] = []
    for index, (arch, network) in enumerate(zip(archs, networks)):
        record = records[index] if index < len(records) else {}
        config = TrainConfig(**{**base, "seed": record.get("seed", base.get("seed", 0))}, arch=arch, weights=str(folder),
                             image_size=source.input_height, scale=source.scale, data=data or data_roots or "", freeze_bn=samples is None)  # fmt: skip
        checkpoint = version_checkpoint(network, source, config, samples)
        path = out / (f"member-{index}.pt" if len(networks) > 1 else "network.pt")
        save_checkpoint(checkpoint, path)
        written.append((path, checkpoint))
    if len(networks) > 1:
        from training.ensemble import member_record

        members = [member_record(path, checkpoint) for path, checkpoint in written]
        ensemble = version_checkpoint(model, source, written[0][1].config, samples, ensemble=members)
        save_checkpoint(ensemble, out / "ensemble.pt")
        written.append((out / "ensemble.pt", ensemble))
    warn_if_split_differs(source, written[-1][1].val_metrics.get("auc"))  # the whole model's
    return [path for path, _ in written]
