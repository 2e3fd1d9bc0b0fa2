"""What every recipe shares: settings, the checkpoint cache with resumable training, evaluation loops,
measurements (size, latency, peak memory), TorchScript export, and the table / JSON / plot writers.

A recipe builds its float model, calls :func:`train` (which returns the cached weights when a finished
checkpoint for the same configuration exists), turns the model into :class:`Variant`\\ s, scores and
measures each with :func:`measure`, and hands the rows to :func:`write_outputs`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import os
import pickle
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from qpasses import PassManager
from qpasses.analysis.metrics import latency, model_size, peak_memory, ssim
from qpasses.cpu import cpu_int8_features
from qpasses.errors import QPassesError
from qpasses.export import lowered_backend
from qpasses.passes import AdaRound
from qpasses.passes.calibrate import progress
from qpasses.quant.backends import get_backend
from qpasses.quant.lowering import quantized_engine
from qpasses.quant.spec import QuantConfig
from qpasses_zoo.data import loader

DEFAULT_CACHE = Path(os.environ.get("QPASSES_CACHE", Path.home() / ".cache" / "qpasses")) / "checkpoints"


class RecipeError(QPassesError):
    """A recipe cannot run as asked (unknown model, unreadable checkpoint, ...); the message says why."""


@dataclass
class Settings:
    """One recipe run, as parsed from the command line."""

    recipe: str
    quick: bool = False
    data: Path | None = None
    out: Path = Path("runs")
    models: list[str] = field(default_factory=list)
    epochs: int | None = None
    cache: Path = DEFAULT_CACHE
    show_progress: bool = True
    threads: int = 2
    size: int | None = None
    adaround_iterations: int | None = None
    bits: list[int] = field(default_factory=list)

    @property
    def latency_iters(self) -> int:
        return 3 if self.quick else 30


def chosen_models(settings: Settings, available: Sequence[str], default: Sequence[str],
                  quick: Sequence[str]) -> list[str]:
    """``--model`` choices (checked against ``available``), else the recipe's default or quick list."""
    unknown = [m for m in settings.models if m not in available]
    if unknown:
        raise RecipeError(f"recipe {settings.recipe!r} studies {', '.join(available)}; not {', '.join(unknown)}")
    return list(settings.models or (quick if settings.quick else default))


# ----------------------------------------------------------------------------------------- processes


def world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed's once a process group is initialised (torchrun),
    else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def training_device() -> torch.device:
    """Where :func:`train` runs: this process's GPU under an NCCL process group, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------ training


def config_hash(config: dict[str, Any]) -> str:
    """12 hex digits identifying a training configuration (JSON with sorted keys, hashed)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def checkpoint_path(cache: Path, name: str, config: dict[str, Any], epoch: int) -> Path:
    return cache / f"{name}-{config_hash(config)}-epoch{epoch:03d}.pt"


def _latest_checkpoint(cache: Path, name: str, config: dict[str, Any], epochs: int) -> tuple[int, Path] | None:
    for epoch in range(epochs, 0, -1):
        path = checkpoint_path(cache, name, config, epoch)
        if path.is_file():
            return epoch, path
    return None


@dataclass
class TrainConfig:
    """How the float model is trained; every field (and the data description) goes into the cache key."""

    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 1e-4
    seed: int = 0


def train(
    model: nn.Module,
    name: str,
    train_set: Dataset,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    config: TrainConfig,
    data_description: str,
    settings: Settings,
) -> dict[str, Any]:
    """Train ``model`` in place (AdamW, cosine learning rate) unless a finished checkpoint is cached.

    After each epoch, model, optimizer, scheduler and losses go to
    ``<cache>/<name>-<config hash>-epoch<NNN>.pt`` and the previous epoch's file is removed; an
    interrupted run resumes from the last epoch written. Each epoch shuffles with seed ``seed + epoch``,
    so a resumed run sees the batches an uninterrupted one would. Returns the training record
    (``losses`` per epoch, ``checkpoint``, ``resumed_from``, ``seconds``). The model ends in eval mode, on
    the CPU.

    Under a torch.distributed process group (torchrun) every process calls this: the model trains as
    ``DistributedDataParallel`` on :func:`training_device`, each process on its ``DistributedSampler`` shard
    in batches of ``batch_size``, and after each epoch every replica takes rank 0's buffers, so all end with
    the same weights and statistics; the losses are averaged over all processes, rank 0 alone writes the
    checkpoints, and the world size is part of the cache key.
    """
    rank, world_size = world()
    key = {"model": name, "data": data_description, **config.__dict__}
    if world_size > 1:  # the effective batch is world_size × batch_size: another training
        key["world_size"] = world_size
    device = training_device()
    settings.cache.mkdir(parents=True, exist_ok=True)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=config.seed) \
        if world_size > 1 else None
    steps_per_epoch = -(-(len(sampler) if sampler is not None else len(train_set)) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    record: dict[str, Any] = {"losses": [], "resumed_from": 0, "config_hash": config_hash(key), "seconds": 0.0}
    found = _latest_checkpoint(settings.cache, name, key, config.epochs)
    start_epoch = 0
    if found is not None:
        start_epoch, path = found
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as exc:
            raise RecipeError(f"checkpoint {path} is unreadable ({exc}); delete it to retrain") from exc
        record.update(losses=list(state["losses"]), resumed_from=start_epoch, checkpoint=str(path))
    torch.manual_seed(config.seed)
    net = model if world_size == 1 else \
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    start = time.perf_counter()
    for epoch in range(start_epoch + 1, config.epochs + 1):
        model.train()
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss × samples, samples
        if sampler is None:
            batches = loader(train_set, config.batch_size, shuffle=True, seed=config.seed + epoch)
        else:
            sampler.set_epoch(epoch)
            batches = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler)
        for inputs, targets in progress(batches, len(batches), f"{name} epoch {epoch}/{config.epochs}",
                                        settings.show_progress and rank == 0):
            inputs, targets = inputs.to(device), targets.to(device)
            loss = loss_fn(net(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            totals += torch.tensor([float(loss.detach()) * len(inputs), len(inputs)], device=device)
        if world_size > 1:
            dist.all_reduce(totals)
            # DDP hands rank 0's buffers to every replica before each forward, after which each updates its
            # own (BN statistics, fake-quant ranges) from its shard: rank 0's last ones are the model's.
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        record["losses"].append(float(totals[0] / totals[1]))
        path = checkpoint_path(settings.cache, name, key, epoch)
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "losses": record["losses"], "config": key}, path)
            checkpoint_path(settings.cache, name, key, epoch - 1).unlink(missing_ok=True)
        record["checkpoint"] = str(path)
    record["seconds"] = time.perf_counter() - start
    model.to("cpu")
    model.eval()
    return record


def first(dataset: Dataset, n: int | None) -> Dataset:
    """The first ``n`` samples of ``dataset`` (all of them if ``n`` is None)."""
    return dataset if n is None or n >= len(dataset) else Subset(dataset, range(n))


def batches(dataset: Dataset, batch_size: int, limit: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """The dataset's batches in order, materialised (evaluation runs them once per variant)."""
    out = []
    for batch in loader(dataset, batch_size):
        if limit is not None and len(out) >= limit:
            break
        out.append(tuple(batch))
    return out


# ---------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One model to score: its label, the module, and what running and sizing it needs.

    ``engine``: the quantized engine it must run under (a TorchScript module carries no pre-hook that
    selects it); ``bits``: weight bits for the packed size (sub-8-bit weights in 8-bit containers);
    ``columns``: extra columns of its row (backend, granularity, ...).
    """

    label: str
    model: nn.Module
    engine: str | None = None
    bits: int | None = None
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass
class Failed:
    """A variant that could not be built: its row says why instead of a number."""

    label: str
    error: str
    columns: dict[str, Any] = field(default_factory=dict)


def pipeline(model: nn.Module, example: torch.Tensor, *passes: Any) -> Callable[[], nn.Module]:
    """A builder for :func:`build`: ``PassManager(passes).run(model, example)`` (``model`` is not changed)."""
    return lambda: PassManager(list(passes)).run(model, example)


def build(label: str, make: Callable[[], nn.Module], **kwargs: Any) -> Variant | Failed:
    """``Variant(label, make(), **kwargs)`` (its engine read from the lowered model unless given), or a
    ``Failed`` row holding the first line of the qpasses error that ``make`` raised."""
    try:
        model = make()
    except QPassesError as exc:
        return Failed(label, f"{type(exc).__name__}: {str(exc).splitlines()[0]}", kwargs.get("columns", {}))
    kwargs.setdefault("engine", engine_of(model))
    return Variant(label, model, **kwargs)


def quant_config(settings: Settings, backend: str, per_channel: bool | None = None) -> QuantConfig:
    """The backend's default config; ``--quick`` observes activations by min/max instead, because the
    default MSE range search costs tens of seconds per model on 2 busy cores."""
    config = get_backend(backend).default_config(per_channel=per_channel)
    if settings.quick:
        config = dataclasses.replace(config, activation=config.activation.replace(observer="minmax"))
    return config


# AdaRound iterations per layer: the data-free/data-light benchmark's default (tools/bench/dfq.py), and a
# handful for --quick (enough to exercise the pass, not to converge).
ADAROUND_ITERATIONS = 200
QUICK_ADAROUND_ITERATIONS = 10
# AdaRound draws one batch per iteration: splitting the calibration batches this small makes each step a few
# times cheaper on a CPU while the run still sees every calibration image.
ADAROUND_BATCH = 8


def adaround_iterations(settings: Settings) -> int:
    """``--adaround-iterations``, else the default for the run."""
    if settings.adaround_iterations is not None:
        return settings.adaround_iterations
    return QUICK_ADAROUND_ITERATIONS if settings.quick else ADAROUND_ITERATIONS


def adaround(calibration: list[torch.Tensor], settings: Settings) -> AdaRound:
    """An AdaRound pass on the calibration images (in batches of ``ADAROUND_BATCH``), with the benchmark's
    learning rate (1e-2) and iteration count (``--quick``: a few iterations)."""
    minibatches = [part for batch in calibration for part in batch.split(ADAROUND_BATCH)]
    return AdaRound(minibatches, iterations=adaround_iterations(settings), lr=1e-2, progress=settings.show_progress)


@dataclass
class QATRun:
    """What QAT fine-tuning needs: the training data and loss, and a cache key naming the float weights it
    starts from (``float_hash``, the float training's config hash)."""

    train_set: Dataset
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batch_size: int
    float_hash: str
    epochs: int = 1
    lr: float = 1e-4


def qat_variant(label: str, model: nn.Module, example: torch.Tensor, passes: Sequence[Any], run: QATRun,
                settings: Settings, **kwargs: Any) -> Variant | Failed:
    """``passes`` (ending in ``QAT``) prepare a trainable copy of ``model``; it is fine-tuned with
    :func:`train` (cached and resumable like the float model) and lowered with ``qpasses.convert``."""
    import qpasses

    def make() -> nn.Module:
        trainable = PassManager(list(passes)).run(model, example)
        words = [label, *map(str, kwargs.get("columns", {}).values())]
        slug = "".join(c if c.isalnum() or c in "+-" else "-" for c in "-".join(words))
        train(trainable, f"qat-{slug}"[:100], run.train_set, run.loss_fn,
              TrainConfig(epochs=run.epochs, lr=run.lr, batch_size=run.batch_size, weight_decay=0.0),
              f"fine-tuning float {run.float_hash} with {[p.name for p in passes]} {kwargs}", settings)
        return qpasses.convert(trainable)

    return build(label, make, **kwargs)


def running(variant: Variant) -> contextlib.AbstractContextManager:
    """The context a variant runs in: its quantized engine, if it has one."""
    return quantized_engine(variant.engine) if variant.engine else contextlib.nullcontext()


def engine_of(model: nn.Module) -> str | None:
    """The quantized engine a lowered qpasses model was built for (None for float and dynamic models)."""
    backend = lowered_backend(model)
    return backend.engine if backend else None


def torchscript(variant: Variant, example: torch.Tensor) -> Variant | Failed:
    """The variant as a frozen TorchScript module: ``qpasses.export.torchscript`` for lowered models
    (trace + freeze, checked against eager), the same two calls for float and dynamic ones."""
    from qpasses.export import torchscript as export_torchscript

    def make() -> nn.Module:
        if variant.engine is not None:
            return export_torchscript(variant.model, example)
        with torch.no_grad():
            try:
                return torch.jit.freeze(torch.jit.trace(variant.model.eval(), example))
            except (RuntimeError, TypeError) as exc:
                raise RecipeError(f"TorchScript: {str(exc).splitlines()[0]}") from exc

    return build(f"{variant.label} (TorchScript)", make, engine=variant.engine, bits=variant.bits,
                 columns={**variant.columns, "runtime": "TorchScript"})


def outputs(variant: Variant, data: Iterable[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """The variant's outputs on every batch of ``data``, concatenated (float)."""
    with running(variant), torch.inference_mode():
        return torch.cat([variant.model(batch[0]).dequantize().float() for batch in data])


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of samples whose label is among the ``k`` largest logits."""
    k = min(k, logits.shape[1])
    return float((logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).double().mean())


def depth_scores(prediction: torch.Tensor, truth: torch.Tensor, data_range: float) -> dict[str, float]:
    """Test MSE (m²) and SSIM of predicted against true depth maps ``(N, 1, H, W)``."""
    return {"mse": float(((prediction.double() - truth.double()) ** 2).mean()),
            "ssim": ssim(truth, prediction, data_range=data_range)}


def size_bytes(variant: Variant) -> int:
    """Bytes of the saved model: ``torch.jit.save`` for TorchScript (frozen weights are constants, not
    state), else the ``state_dict``; sub-8-bit weights counted packed at ``variant.bits``."""
    if isinstance(variant.model, torch.jit.ScriptModule):
        buffer = io.BytesIO()
        torch.jit.save(variant.model, buffer)
        return buffer.getbuffer().nbytes
    sizes = model_size(variant.model, bits=variant.bits if variant.bits and variant.bits < 8 else None)
    return sizes["packed_bytes"] if sizes["packed_bytes"] is not None else sizes["serialized_bytes"]


def measure(variant: Variant, example: torch.Tensor, settings: Settings, memory: bool = False) -> dict[str, float]:
    """Size (MB), mean batch-1 latency (ms, ``settings.threads`` threads) and, if ``memory``, peak
    activation memory (MB)."""
    with running(variant):
        timing = latency(variant.model, (example,), warmup=2 if settings.quick else 5,
                         iters=settings.latency_iters, threads=settings.threads)
        result = {"size_mb": size_bytes(variant) / 2**20, "latency_ms": timing["mean_ms"]}
        if memory:
            result["peak_mb"] = peak_memory(variant.model, (example,)) / 2**20
    return result


def score_all(variants: Sequence[Variant | Failed], score: Callable[[Variant], dict[str, Any]],
              example: torch.Tensor, settings: Settings, memory: bool = False) -> list[dict[str, Any]]:
    """One row per variant: its columns, ``score(variant)`` and its measurements, or its error."""
    rows = []
    for variant in progress(variants, len(variants), "scoring variants", settings.show_progress):
        row: dict[str, Any] = {"variant": variant.label, **variant.columns}
        if isinstance(variant, Failed):
            row["error"] = variant.error
        else:
            row.update(score(variant))
            row.update(measure(variant, example, settings, memory))
        rows.append(row)
    return rows


def copy_of(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode (variants never share a module with the float model)."""
    return copy.deepcopy(model).eval()


# -------------------------------------------------------------------------------------------- output


@dataclass(frozen=True)
class Column:
    """A table column: the row key, its header, and how to format a number."""

    key: str
    header: str
    fmt: str = "{}"

    def cell(self, row: dict[str, Any]) -> str:
        value = row.get(self.key)
        if value is None:
            return ""
        return self.fmt.format(value) if isinstance(value, int | float) else str(value)


def markdown(columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table; a failed row shows its error in place of its numbers."""
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [c.cell(row) for c in columns]
        if "error" in row:
            filled = sum(1 for c in cells if c)
            cells = cells[:filled] + [f"fails: {row['error']}"] + [""] * (len(columns) - filled - 1)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class PlotAxes:
    """What the plot shows: ``y`` (a score) against latency, marker area ∝ size, one colour per ``group``."""

    y: str
    y_label: str
    group: str | None = None


def plot(rows: Sequence[dict[str, Any]], axes: PlotAxes, title: str, path: Path) -> Path | None:
    """Score vs latency, marker area proportional to size (MB), labelled; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scored = [r for r in rows if "error" not in r and axes.y in r]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in scored:
        groups.setdefault(str(row.get(axes.group, "")) if axes.group else "", []).append(row)
    largest = max((r["size_mb"] for r in scored), default=1.0) or 1.0
    fig, ax = plt.subplots(figsize=(9, 6))
    for group, members in groups.items():
        ax.scatter([r["latency_ms"] for r in members], [r[axes.y] for r in members],
                   s=[20 + 400 * r["size_mb"] / largest for r in members], alpha=0.6, label=group or None)
        for r in members:
            ax.annotate(r["variant"], (r["latency_ms"], r[axes.y]), fontsize=6, alpha=0.8)
    ax.set_xlabel("mean batch-1 CPU latency (ms)")
    ax.set_ylabel(axes.y_label)
    ax.set_title(f"{title}\n(marker area ∝ size in MB)", fontsize=10)
    if axes.group:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def machine(settings: Settings) -> str:
    """The CPU (model and int8 features: they decide the kernels and x86's activation bits) next to the timings."""
    return (f"{cpu_int8_features()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"latency with {settings.threads} thread(s), batch 1")


def write_outputs(settings: Settings, title: str, columns: Sequence[Column], rows: Sequence[dict[str, Any]],
                  axes: PlotAxes, meta: dict[str, Any]) -> dict[str, Path]:
    """Write ``<recipe>.md`` (the table), ``<recipe>.json`` (rows and settings) and ``<recipe>.png``
    (the plot) under ``settings.out``; returns the paths written."""
    settings.out.mkdir(parents=True, exist_ok=True)
    stem = settings.out / settings.recipe
    notes = "\n".join(f"- {k}: {v}" for k, v in {**meta, "machine": machine(settings)}.items())
    table = markdown(columns, rows)
    paths = {"markdown": stem.with_suffix(".md"), "json": stem.with_suffix(".json")}
    paths["markdown"].write_text(f"# {title}\n\n{notes}\n\n{table}\n")
    document = {"recipe": settings.recipe, "title": title, "quick": settings.quick, "machine": machine(settings),
                "data": str(settings.data) if settings.data else None, "meta": meta, "rows": list(rows)}
    paths["json"].write_text(json.dumps(document, indent=2, default=str) + "\n")
    drawn = plot(rows, axes, title, stem.with_suffix(".png"))
    if drawn is not None:
        paths["plot"] = drawn
    print(f"\n# {title}\n\n{table}\n")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


# ------------------------------------------------------------------------------- classification tasks

# The real dataset of each CIFAR-style model (read from --data); offline, all of them learn sklearn's digits.
CIFAR_DATASETS = {"cifar_resnet18": "cifar10", "cifar_resnet34": "cifar10", "cifar_resnet50": "cifar10",
                  "preact_resnet34": "cifar100"}
QUICK_SAMPLES = 64
# Epochs of the classifiers by default; the resnet and bits recipes share their checkpoints.
CLASSIFIER_EPOCHS = 3


@dataclass
class ClassificationTask:
    """A CIFAR-style model with its training and test data."""

    model_name: str
    train_set: Dataset
    test_set: Dataset
    num_classes: int
    description: str
    input_size: int


def classification_task(model_name: str, settings: Settings) -> ClassificationTask:
    """The data ``model_name`` trains on: CIFAR-10/100 under ``--data``, else sklearn's digits at 32×32
    (16×16 and 64 samples with ``--quick``)."""
    from qpasses_zoo import data as zoo_data

    if model_name not in CIFAR_DATASETS:
        raise RecipeError(f"model {model_name!r} is not one of this recipe's: {', '.join(CIFAR_DATASETS)}")
    size = 16 if settings.quick else 32
    if settings.data is None:
        train_set, test_set = zoo_data.digits("train", size=size), zoo_data.digits("test", size=size)
        classes, description = 10, f"sklearn digits upscaled to {size}x{size}"
    else:
        name = CIFAR_DATASETS[model_name]
        train_set = zoo_data.get(name, settings.data, split="train")
        test_set = zoo_data.get(name, settings.data, split="test")
        classes, description, size = (100 if name == "cifar100" else 10), f"{name} at {settings.data}", 32
    if settings.quick:
        train_set, test_set = first(train_set, QUICK_SAMPLES), first(test_set, QUICK_SAMPLES)
        description += f", first {QUICK_SAMPLES} samples"
    return ClassificationTask(model_name, train_set, test_set, classes, description, size)


def classifier_qat(task: ClassificationTask, record: dict[str, Any], settings: Settings) -> QATRun:
    """QAT fine-tuning of a trained classifier: one epoch of cross-entropy on its training set."""
    return QATRun(task.train_set, nn.functional.cross_entropy, 16 if settings.quick else 32, record["config_hash"])


def trained_classifier(task: ClassificationTask, settings: Settings) -> tuple[nn.Module, dict]:
    """The task's zoo model trained with cross-entropy (from the cache when it holds this configuration)."""
    import qpasses_zoo as zoo

    torch.manual_seed(0)
    model = zoo.get(task.model_name, num_classes=task.num_classes)
    epochs = settings.epochs or (1 if settings.quick else CLASSIFIER_EPOCHS)
    config = TrainConfig(epochs=epochs, lr=2e-3, batch_size=16 if settings.quick else 32)
    record = train(model, task.model_name, task.train_set, nn.functional.cross_entropy, config,
                   task.description, settings)
    return model, record


def calibration_batches(task: ClassificationTask, settings: Settings) -> list[torch.Tensor]:
    """Training images for calibration: 2 batches of 16 with ``--quick``, else 8 of 32."""
    return [b[0] for b in batches(task.train_set, 16 if settings.quick else 32, limit=2 if settings.quick else 8)]


def training_note(task: ClassificationTask, record: dict[str, Any]) -> str:
    return (f"{task.description}; trained {len(record['losses'])} epochs (final loss {record['losses'][-1]:.3f}), "
            f"checkpoint {record.get('checkpoint')}")


def classification_score(test: list[tuple[torch.Tensor, ...]]) -> Callable[[Variant], dict[str, float]]:
    """Top-1 and top-5 accuracy (%) on the test batches."""
    labels = torch.cat([b[1] for b in test])

    def score(variant: Variant) -> dict[str, float]:
        logits = outputs(variant, test)
        return {"top1": 100 * topk_accuracy(logits, labels, 1), "top5": 100 * topk_accuracy(logits, labels, 5)}

    return score
