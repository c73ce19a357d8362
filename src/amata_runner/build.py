"""From a resolved config to the objects a run trains with, built once and in a fixed order.

The order is part of the result: the model's initial weights, the data order and every random
start come from the global RNG seeded here, so building the same things in another order would
train other weights. Everything that draws from the global RNG is built after
:func:`seed_everything`, in the order of :func:`build_run`; what must not disturb it (the
evaluation subset, the criterion's and the adaptive schedule's probe batches, Fast's validation
batch) draws from generators of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from amata_runner.attacks.suite import SuiteOptions, paper_cw_l2_c
from amata_runner.control.adaptive import build_adaptive
from amata_runner.control.criterion import CriterionProbe
from amata_runner.control.schedules import ControlSchedule, Schedule
from amata_runner.data import (
    DeviceLoader,
    StreamingLoader,
    TestData,
    ValidationSplit,
    eval_subset,
    load_run_data,
    make_train_loader,
)
from amata_runner.errors import ConfigError
from amata_runner.evaluation import AttackSpec
from amata_runner.methods import Method, TrainContext, build_method
from amata_runner.methods.registry import method_spec
from amata_runner.runtime.device import configure_backend, seed_everything, select_device
from amata_runner.runtime.distributed import Dist, from_env, init_process_group
from amata_runner.runtime.nonfinite import GuardedSGD
from amata_runner.runtime.passes import PassCounter
from amata_runner.runtime.precision import Precision, maybe_compile, training_precision
from amata_runner.runtime.run_files import build_model_for

if TYPE_CHECKING:
    from amata_runner.runtime.run_state import Start

log = logging.getLogger(__name__)


@dataclass
class Run:
    """The ready objects of one run; the engine trains with them and owns none of their set-up."""

    job: Dist
    device: torch.device
    test_set: TestData
    validation: ValidationSplit  # which training images were held out
    # The test subset is measured (curves, time to target), never used to choose anything;
    # best.ckpt and Fast's early-stop check are decided on the validation split.
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    val_images: torch.Tensor | None
    val_labels: torch.Tensor | None
    loader: DeviceLoader | StreamingLoader
    criterion: CriterionProbe | None
    model: torch.nn.Module
    optimizer: GuardedSGD
    precision: str
    counter: PassCounter
    method: Method
    epochs: int  # as the method runs them (Fast's early stop may end sooner)
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    lr_per_iteration: bool
    schedule: ControlSchedule | None  # None: the method reads no control
    eval_attack: AttackSpec
    final_options: SuiteOptions


def build_run(cfg: DictConfig, start: Start | None = None) -> Run:
    """Set up the device and build everything ``cfg`` asks for; ``start``: the checkpoint a
    resumed run continues from (its validation split must be the one drawn now).

    Raises :class:`ConfigError` for settings that only show up once data and method are known.
    """
    job = from_env()
    device = select_device(cfg.device)
    if job.enabled and device.type == "cuda":
        device = torch.device("cuda", job.local_rank)
    init_process_group(job, device.type == "cuda")
    if job.enabled and cfg.method.get("layer_one_milestones") is not None:
        raise ConfigError(
            "method.layer_one_milestones",
            list(cfg.method.layer_one_milestones),
            "null under torchrun (a second optimiser for layer one is not synchronised)",
        )
    configure_backend(device, cfg.deterministic)
    seed_everything(cfg.seed)

    data = load_run_data(cfg)  # the training split less the validation images
    train_set, test_set = data.train, data.test
    validation = data.split
    if start is not None:  # the same held-out images, or the run is not one run
        validation.check_resumed(start.state.get("validation"))
    if not validation.count and cfg.save_best:
        log.info("eval.validation.size=0: no validation split, so no best.ckpt is written")
    # Probe batches for the criterion C, drawn with their own generator (no global RNG).
    criterion = (
        CriterionProbe(cfg.eval.criterion, train_set, device)
        if cfg.eval.criterion.enabled
        else None
    )
    subset = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(cfg.eval.seed))
    subset = subset[: cfg.eval.subset].sort().values
    eval_images, eval_labels = eval_subset(test_set, subset, device)
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    if data.validation is not None:
        every = torch.arange(len(data.validation))
        val_images, val_labels = eval_subset(data.validation, every, device)
    loader = make_train_loader(
        train_set,
        cfg.dataset,
        cfg.batch_size,
        device,
        seed=cfg.seed,
        rank=job.rank,
        world=job.world,
    )
    if len(loader) == 0:  # it would "complete" having trained nothing
        raise ConfigError(
            "batch_size",
            cfg.batch_size,
            f"larger than the {len(train_set)} training images split over "
            f"{job.world} process(es), so no full batch can be drawn",
        )

    ds = cfg.dataset
    model = build_model_for(cfg, device)
    job.broadcast_module(model)  # every rank starts from rank 0's weights
    optimizer = GuardedSGD(
        model.parameters(),
        skip_nonfinite=cfg.nonfinite == "skip",
        job=job,
        module=model,
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        nesterov=cfg.optim.nesterov,
    )
    precision = training_precision(cfg.precision, device)
    autocasts = Precision(precision, device)
    counter = PassCounter()
    context = TrainContext(
        # compile=true: the method's forwards/backwards go through torch.compile; evaluation
        # and checkpoints use the model itself (the same parameters).
        model=maybe_compile(model, bool(cfg.get("compile", False)), device),
        optimizer=optimizer,
        counter=counter,
        autocast=autocasts.update,
        attack_autocast=autocasts.attack,
        device=device,
        num_train=len(train_set),
        image_shape=(ds.channels, ds.image_size, ds.image_size),
        num_classes=ds.num_classes,
        iters_per_epoch=len(loader),
        epochs=cfg.epochs,
        job=job,
        validation_batch=validation_batch(cfg, val_images, val_labels, job, device),
    )
    method = build_method(cfg.method, context)
    epochs = method.epochs(cfg.epochs)
    lr_scheduler = build_lr_scheduler(cfg.optim, optimizer, epochs, len(loader))
    schedule: ControlSchedule | None = None
    if method.uses_control and cfg.schedule.name == "adaptive":
        schedule = build_adaptive(cfg, train_set, device, len(loader), counter)
    elif method.uses_control:
        schedule = build_schedule(cfg, epochs, len(loader))
    return Run(
        job=job,
        device=device,
        test_set=test_set,
        validation=validation,
        eval_images=eval_images,
        eval_labels=eval_labels,
        val_images=val_images,
        val_labels=val_labels,
        loader=loader,
        criterion=criterion,
        model=model,
        optimizer=optimizer,
        precision=precision,
        counter=counter,
        method=method,
        epochs=epochs,
        lr_scheduler=lr_scheduler,
        lr_per_iteration=cfg.optim.lr_schedule == "cyclic",
        schedule=schedule,
        eval_attack=AttackSpec(**_attack_args(cfg.eval.attack)),
        final_options=SuiteOptions(
            eps=float(cfg.eval.final_threat.eps),
            step_size=float(cfg.eval.final_threat.step_size),
            cw_l2_c=paper_cw_l2_c(cfg.dataset.name),
        ),
    )


def validation_batch(
    cfg: DictConfig,
    images: torch.Tensor | None,
    labels: torch.Tensor | None,
    job: Dist,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A fixed batch of validation images (uint8) for a method's own checks (Fast's early
    stop): ``batch_size`` of them drawn by the split's seed; this rank's share (torchrun)."""
    if images is None or labels is None:
        return None
    n = int(labels.shape[0])
    seed = int(cfg.eval.validation.seed)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    pick = pick[: cfg.batch_size]
    mine = pick.tensor_split(job.world)[job.rank]
    pick = (mine if len(mine) else pick).to(device)
    return images.index_select(0, pick), labels.index_select(0, pick)


def build_lr_scheduler(
    cfg: DictConfig, optimizer: torch.optim.Optimizer, epochs: int, iters_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """multistep (the paper's CIFAR10 75/90), cosine, constant: stepped once per epoch;
    cyclic (Fast's 0 -> lr -> 0 triangle over the whole run): stepped every iteration."""
    if cfg.lr_schedule == "cyclic":
        total = max(epochs * iters_per_epoch, 2)
        return torch.optim.lr_scheduler.CyclicLR(
            optimizer,
            base_lr=0.0,
            max_lr=cfg.lr,
            step_size_up=total // 2,
            step_size_down=total - total // 2,
            cycle_momentum=cfg.cycle_momentum,
            base_momentum=0.8,
            max_momentum=cfg.momentum,
        )
    if cfg.lr_schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma
        )
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


def build_schedule(cfg: DictConfig, epochs: int, iters_per_epoch: int) -> Schedule:
    s = cfg.schedule
    return Schedule(
        switch=float(s.switch),
        name=s.name,
        k_min=int(s.k_min),
        k_max=method_spec(cfg.method.name).k_max(cfg),
        step_size=float(cfg.method.step_size),
        epochs=epochs,
        iters_per_epoch=iters_per_epoch,
        tau=None if s.tau is None else float(s.tau),
        eta=float(s.eta),
        unit=s.unit,
        endpoint=s.endpoint,
    )


def _attack_args(cfg: DictConfig) -> dict[str, Any]:
    return {
        "eps": float(cfg.eps),
        "step_size": float(cfg.step_size),
        "steps": int(cfg.steps),
        "random_start": bool(cfg.random_start),
    }
