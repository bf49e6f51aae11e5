"""Training and evaluation: metrics, the training loop behind ``lsef train`` and ``lsef demo``,
checkpoints, and DistributedDataParallel when started by ``torchrun``.

Metrics: WAR (weighted average recall = accuracy), UAR (unweighted average recall = mean of
per-class recalls), and CCC (Lin's concordance correlation coefficient) for valence/arousal.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import CONDITIONS, CORRUPTIONS, FeatureFolder, SyntheticAffect, corrupt
from .nn import LSEF, LSEFOutput, build_model

__all__ = [
    "war",
    "uar",
    "ccc",
    "TrainConfig",
    "Trainer",
    "evaluate",
    "evaluate_conditions",
    "corrupted_average",
    "predict",
    "load_data",
    "load_test_sets",
    "distributed_env",
]


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def war(pred: Tensor, y: Tensor) -> float:
    """Weighted average recall: the accuracy of class predictions (or logits) ``pred``."""
    if pred.dim() == 2:
        pred = pred.argmax(-1)
    return float((pred == y).float().mean()) if y.numel() else float("nan")


def uar(pred: Tensor, y: Tensor, num_classes: Optional[int] = None) -> float:
    """Unweighted average recall: the mean over classes present in ``y`` of their recall."""
    if pred.dim() == 2:
        num_classes = num_classes or pred.shape[-1]
        pred = pred.argmax(-1)
    num_classes = num_classes or int(max(int(y.max()), int(pred.max())) + 1)
    recalls = []
    for c in range(num_classes):
        m = y == c
        if m.any():
            recalls.append(float((pred[m] == c).float().mean()))
    return sum(recalls) / len(recalls) if recalls else float("nan")


def ccc(pred: Tensor, target: Tensor) -> Tensor:
    """Lin's concordance correlation coefficient along dim 0, per column:
    ``2 cov(x, y) / (var x + var y + (mean x − mean y)²)`` (population moments)."""
    mx, my = pred.mean(0), target.mean(0)
    vx, vy = pred.var(0, unbiased=False), target.var(0, unbiased=False)
    cov = ((pred - mx) * (target - my)).mean(0)
    return 2 * cov / (vx + vy + (mx - my) ** 2 + 1e-12)


# --------------------------------------------------------------------------------------------
# configuration and data
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything one training run depends on (``lsef train`` flags map onto these fields)."""

    model: str = "lsef"
    task: str = "classification"
    data: Optional[str] = None  # a FeatureFolder root; None: SyntheticAffect
    n_train: int = 2048
    n_test: int = 1024
    T: int = 16
    D: int = 64
    data_seed: int = 0
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-2
    seed: int = 0
    rao: bool = True
    d_model: int = 64
    rank: int = 4
    device: str = "cpu"
    ops: str = "ext"
    out: Optional[str] = None  # folder for checkpoint.pt, metrics.csv, metrics.json
    resume: bool = False
    extra: Dict[str, object] = field(default_factory=dict)  # more LSEF keyword arguments
    rao_options: Dict[str, object] = field(default_factory=dict)  # more RAO keyword arguments


def load_data(
    cfg: TrainConfig, split: str, corruption: Optional[str] = None, severity: float = 1.0
) -> Tuple[Tensor, Tensor, int]:
    """``(x, targets, num_classes)`` of one split, from ``cfg.data`` or the synthetic set."""
    if cfg.data:
        ds = FeatureFolder(cfg.data, split=split, frames=cfg.T if cfg.T else None, task=cfg.task)
        x, t = ds.tensors()
        if corruption:
            x = corrupt(x, corruption, severity, torch.Generator().manual_seed(cfg.data_seed + 99))
        return x, t, getattr(ds, "num_classes", 2)
    n = cfg.n_train if split == "train" else cfg.n_test
    ds = SyntheticAffect(
        n,
        split=split,
        T=cfg.T,
        D=cfg.D,
        seed=cfg.data_seed,
        task=cfg.task,
        corruption=corruption,
        severity=severity,
    )
    x, t = ds.tensors()
    return x, t, ds.num_classes


def load_test_sets(
    cfg: TrainConfig, conditions: Sequence[str] = CONDITIONS
) -> Dict[str, Tuple[Tensor, Tensor]]:
    """``{condition: (x, targets)}``: the test split clean (``"clean"``) and under each named
    corruption, for :func:`evaluate_conditions` (load once, evaluate several models)."""
    return {c: load_data(cfg, "test", None if c == "clean" else c)[:2] for c in conditions}


def distributed_env() -> Tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` without)."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def _output(out) -> Tensor:
    return out.pred if isinstance(out, LSEFOutput) else out


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 256, device: str = "cpu") -> Tensor:
    """The model's outputs (logits or valence/arousal) for all of ``x``, in eval mode."""
    was = model.training
    model.eval()
    outs = [
        _output(model(x[i : i + batch_size].to(device))).float().cpu()
        for i in range(0, x.shape[0], batch_size)
    ]
    model.train(was)
    return torch.cat(outs)


def evaluate(
    model: nn.Module, x: Tensor, t: Tensor, task: str = "classification", device: str = "cpu"
) -> Dict[str, float]:
    """``{"war", "uar"}`` (classification) or ``{"ccc_valence", "ccc_arousal"}`` (regression)."""
    p = predict(model, x, device=device)
    if task == "classification":
        return {"war": war(p, t), "uar": uar(p, t, p.shape[-1])}
    c = ccc(p, t.float())
    return {"ccc_valence": float(c[0]), "ccc_arousal": float(c[1])}


def evaluate_conditions(
    model: nn.Module,
    cfg: TrainConfig,
    conditions: Sequence[str] = CONDITIONS,
    test_sets: Optional[Dict[str, Tuple[Tensor, Tensor]]] = None,
    device: Union[str, torch.device, None] = None,
) -> Dict[str, Dict[str, float]]:
    """``{condition: evaluate(...)}``: the metrics of ``model`` on the test set of each of
    ``conditions`` (``"clean"`` and names in ``CORRUPTIONS``), in that order.

    A condition's test set is taken from ``test_sets`` (as :func:`load_test_sets` returns) when
    it is there, else loaded with ``load_data(cfg, "test", corruption)``; ``cfg.task`` picks the
    metrics. ``device``: where to run the model; default, where its parameters are."""
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    out = {}
    for c in conditions:
        x, t = (
            test_sets[c]
            if test_sets is not None and c in test_sets
            else load_test_sets(cfg, (c,))[c]
        )
        out[c] = evaluate(model, x, t, cfg.task, device)
    return out


def corrupted_average(metrics: Dict[str, Dict[str, float]], key: str = "war") -> float:
    """The mean of ``metrics[c][key]`` over the corruptions ``c`` in ``CORRUPTIONS``
    (``metrics`` as :func:`evaluate_conditions` returns)."""
    return sum(metrics[c][key] for c in CORRUPTIONS) / len(CORRUPTIONS)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


class Trainer:
    """Trains one model on one data set; under torchrun, with DistributedDataParallel.

    ``fit()`` runs ``cfg.epochs`` epochs of AdamW (wrapped in :class:`lsef_ext.optim.RAO` when
    ``cfg.rao``) with a cosine learning-rate schedule, the task loss (cross-entropy, or MSE plus
    ``1 − CCC``) plus the model's consistency regulariser (LSEF models), and records one row of
    metrics per epoch. With ``cfg.out`` it writes ``checkpoint.pt`` after every epoch and
    ``metrics.csv`` / ``metrics.json``; ``cfg.resume`` continues from that checkpoint.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        train: Tuple[Tensor, Tensor, int],
        val: Optional[Tuple[Tensor, Tensor]] = None,
        progress: bool = True,
        desc: Optional[str] = None,
    ):
        from .optim import RAO

        self.cfg, self.progress, self.desc = cfg, progress, desc or cfg.model
        self.rank, self.world, local = distributed_env()
        self.distributed = self.world > 1
        self.device = torch.device(cfg.device)
        if self.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cuda":
                self.device = torch.device("cuda", local)
                torch.cuda.set_device(self.device)
        self.x, self.t, self.num_classes = train
        self.val = val
        torch.manual_seed(cfg.seed)
        model = build_model(
            cfg.model,
            self.x.shape[-1],
            self.num_classes,
            task=cfg.task,
            ops=cfg.ops,
            **({"d_model": cfg.d_model, "rank": cfg.rank} if cfg.model.startswith("lsef") else {}),
            **cfg.extra,
        )
        self.model = model.to(self.device)
        if self.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        inner = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.opt = RAO(inner, rank=cfg.rank, ops=cfg.ops, **cfg.rao_options) if cfg.rao else inner
        self.steps_per_epoch = math.ceil(self.x.shape[0] / (cfg.batch_size * self.world))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            inner,
            lambda s: (
                0.5
                * (1 + math.cos(math.pi * min(s / max(cfg.epochs * self.steps_per_epoch, 1), 1.0)))
            ),
        )
        self.epoch = 0
        self.history: List[Dict[str, float]] = []
        if cfg.resume:
            self.load()

    # -- checkpoints ------------------------------------------------------------------------
    def _ckpt_path(self) -> Optional[str]:
        return os.path.join(self.cfg.out, "checkpoint.pt") if self.cfg.out else None

    def save(self) -> None:
        path = self._ckpt_path()
        if path is None or self.rank != 0:
            return
        os.makedirs(self.cfg.out, exist_ok=True)
        state = {
            "config": asdict(self.cfg),
            "epoch": self.epoch,
            "history": self.history,
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": torch.get_rng_state(),
        }
        tmp = path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load(self) -> None:
        path = self._ckpt_path()
        if path is None or not os.path.isfile(path):
            raise FileNotFoundError(
                f"resume: no checkpoint at {path} (pass --out of an earlier run)"
            )
        # weights_only: a checkpoint is data (tensors, numbers, strings, lists and dicts), and
        # unpickling anything else could run code from the file.
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(
                f"resume: cannot read checkpoint {path} ({type(e).__name__}: {first}); "
                "it is damaged, or it was not written by lsef train"
            ) from e
        missing = {"config", "epoch", "history", "model", "optimizer", "scheduler", "rng"} - (
            set(state) if isinstance(state, dict) else set()
        )
        if missing:
            raise ValueError(
                f"resume: {path} is not a checkpoint of lsef train (missing "
                f"{', '.join(sorted(missing))})"
            )
        saved = state["config"]
        for key in ("model", "task", "d_model", "rank", "rao"):
            if saved.get(key) != getattr(self.cfg, key):
                raise ValueError(
                    f"resume: checkpoint {path} has {key}={saved.get(key)!r}, this run "
                    f"has {key}={getattr(self.cfg, key)!r}"
                )
        _unwrap(self.model).load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.epoch, self.history = state["epoch"], state["history"]

    def write_metrics(self) -> None:
        if not self.cfg.out or self.rank != 0 or not self.history:
            return
        os.makedirs(self.cfg.out, exist_ok=True)
        # Each file is written beside its final name and then renamed over it: a run killed
        # mid-write leaves the previous complete file, never a truncated one.
        path = os.path.join(self.cfg.out, "metrics.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"config": asdict(self.cfg), "history": self.history}, f, indent=2)
        os.replace(path + ".tmp", path)
        keys = list(self.history[0])
        path = os.path.join(self.cfg.out, "metrics.csv")
        with open(path + ".tmp", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.history)
        os.replace(path + ".tmp", path)

    # -- the loop ---------------------------------------------------------------------------
    def _loss(self, out, t: Tensor) -> Tensor:
        pred = _output(out)
        if self.cfg.task == "classification":
            loss = F.cross_entropy(pred, t)
        else:
            loss = F.mse_loss(pred, t) + (1 - ccc(pred, t)).mean()
        model = _unwrap(self.model)
        if isinstance(model, LSEF):
            loss = loss + model.regulariser(out)
        return loss

    def train_step(self, xb: Tensor, tb: Tensor) -> float:
        """One optimisation step on a batch; returns the loss."""
        loss = self._loss(self.model(xb), tb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return float(loss.detach())

    def fit(self) -> List[Dict[str, float]]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed * 9973 + 1)
        for _ in range(self.epoch):  # a resumed run continues the shuffling sequence
            torch.randperm(self.x.shape[0], generator=g)
        while self.epoch < cfg.epochs:
            perm = torch.randperm(self.x.shape[0], generator=g)
            if self.distributed:
                # Every rank takes the same number of steps (DDP all-reduces in every backward):
                # the permutation is wrapped around to world * steps * batch indices, as
                # DistributedSampler pads, and each rank takes a contiguous share.
                per_rank = self.steps_per_epoch * cfg.batch_size
                perm = perm[torch.arange(self.world * per_rank) % perm.numel()]
                mine = perm[self.rank * per_rank : (self.rank + 1) * per_rank]
            else:
                mine = perm
            t0, total, n = time.perf_counter(), 0.0, 0
            bar = tqdm(
                range(0, mine.numel(), cfg.batch_size),
                leave=False,
                dynamic_ncols=True,
                desc=f"{self.desc} epoch {self.epoch + 1}/{cfg.epochs}",
                disable=None if self.progress and self.rank == 0 else True,
            )
            self.model.train()
            for i in bar:
                idx = mine[i : i + cfg.batch_size]
                loss = self.train_step(self.x[idx].to(self.device), self.t[idx].to(self.device))
                total, n = total + loss * idx.numel(), n + idx.numel()
                bar.set_postfix(loss=f"{loss:.3f}")
            bar.close()
            self.epoch += 1
            row = {
                "epoch": self.epoch,
                "loss": total / max(n, 1),
                "seconds": time.perf_counter() - t0,
            }
            if self.val is not None:
                row.update(
                    {
                        f"val_{k}": v
                        for k, v in evaluate(
                            _unwrap(self.model), *self.val, cfg.task, self.device
                        ).items()
                    }
                )
            self.history.append(row)
            self.save()
            self.write_metrics()
        return self.history

    @property
    def net(self) -> nn.Module:
        """The trained model (without the DDP wrapper)."""
        return _unwrap(self.model)
