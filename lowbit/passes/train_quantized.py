"""Quantization-aware training with a progressive bit-width schedule (FraQAT §3; plain QAT as its baseline).

Runs after ``insert_fake_quantizers``: trains every weight quantizer's offset Δ (and, with LSQ,
its step) by distillation — the mean squared error between the quantized graph's outputs and the
full-precision graph's (the same graph with its quantizers disabled) on the calibration samples
kept for this pass, which are the inputs the model's own sampler produced: data-free, as
EfficientDM and FraQAT train (the teacher's outputs are computed once and held: memory grows
with the kept samples times the output size). A :class:`~lowbit.ir.bit_schedule.BitSchedule` (``qat_schedule``,
pairs of [bits above the final bit-width, relative length], over ``qat_steps`` steps) sets the
weights' bit-width buffers before each step; activations stay at their final bit-widths.

Choices the paper leaves open, made here: Adam at a learning rate ``lr``, constant or decayed
to zero along a cosine (``lr_decay``); one kept
sample (a whole calibration batch, one step of the sampler) per training step, in an order drawn
from ``seed`` (a permutation per pass over the samples); Δ starts at zero. With
``checkpoint_dir`` the quantizers' and the optimizer's state are written every
``checkpoint_every`` steps (safetensors; the last two kept) and a run started again with the same
settings resumes from the latest one, giving the same result as an uninterrupted run.

``micro_batches`` splits every step's batch into equal parts whose gradients are accumulated
(memory). Under ``torchrun`` the run is data-parallel: each process takes its share of those
parts, gradients and losses are averaged over processes (DDP's all-reduce), so the loss curve is
that of one process with the same global batch and as many parts. (Not bit for bit the curve of
one part per batch: a different GEMM blocking moves float32 results by 1e-7, enough to flip a
rounding in some quantizer, which moved the loss by up to 3% on the reference model.) The
history of bit-widths and losses is saved as the ``qat_history`` artifact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.fx
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from lowbit.ir.bit_schedule import FRAQAT_SCHEDULE, BitSchedule
from lowbit.ir.capture import batch_size
from lowbit.ir.fake_quantizers import FAKE_QUANTIZERS, WeightFakeQuantizer, fake_quantizers, quantization_disabled
from lowbit.ir.training_history import HISTORY_ARTIFACT, TrainingHistory
from lowbit.passes.base import Pass, PassContext, PassError, PassResult

__all__ = ["TrainQuantized", "distillation_loss"]

_KEEP_CHECKPOINTS = 2


def distillation_loss(outputs, targets) -> torch.Tensor:
    """Mean squared error between the student's and the teacher's floating-point outputs, averaged over outputs."""
    pairs = [(o, t) for o, t in zip(pytree.tree_leaves(outputs), pytree.tree_leaves(targets))
             if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return torch.stack([(o.float() - t.float()).pow(2).mean() for o, t in pairs]).mean()


def _processes() -> tuple[int, int]:
    """(rank, world size) of the data-parallel group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _part(inputs: dict, index: int, parts: int, where: str) -> dict:
    """Part ``index`` of ``parts`` equal parts of a sample's batch rows."""
    if parts == 1:
        return inputs
    batch = batch_size(inputs)
    if batch is None or batch % parts:
        raise PassError(f"{where}: a batch of {batch} rows cannot be split into {parts} equal parts (processes × "
                        f"micro_batches); calibrate with a batch that is a multiple of it")
    lo, hi = index * batch // parts, (index + 1) * batch // parts
    return pytree.tree_map(lambda t: t[lo:hi] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == batch else t, inputs)


class TrainQuantized(Pass):
    name = "train_quantized"
    phase = "decide"
    requires = ("insert_fake_quantizers",)
    before = ("fold_fake_quantizers",)

    def __init__(self, qat_steps: int = 400, qat_schedule: tuple[tuple[float, float], ...] = FRAQAT_SCHEDULE,
                 lr: float = 3e-5, lr_decay: Literal["constant", "cosine"] = "constant", samples: int = 64, seed: int = 0,
                 micro_batches: int = 1, checkpoint_dir: str = "", checkpoint_every: int = 50):
        if min(samples, checkpoint_every, micro_batches) < 1:
            raise ValueError(f"samples, micro_batches and checkpoint_every must be at least 1; got {samples}, "
                             f"{micro_batches}, {checkpoint_every}")
        if not lr > 0:
            raise ValueError(f"lr must be positive; got {lr}")
        self.schedule = BitSchedule(qat_schedule, qat_steps)
        self.lr, self.lr_decay, self.kept_samples, self.seed, self.micro_batches = lr, lr_decay, samples, seed, micro_batches
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every

    def settings(self) -> dict:
        """The settings that decide the run's result (recorded in checkpoints and in the history)."""
        return {"qat_steps": self.schedule.steps, "qat_schedule": [list(s) for s in self.schedule.stages], "lr": self.lr,
                "lr_decay": self.lr_decay, "samples": self.kept_samples, "seed": self.seed, "micro_batches": self.micro_batches}

    def learning_rate(self, step: int) -> float:
        """Constant, or a cosine from ``lr`` down to 0 over the budget."""
        if self.lr_decay == "constant":
            return self.lr
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * step / self.schedule.steps))

    @staticmethod
    def _fingerprint(settings: dict, quantizers: list[WeightFakeQuantizer]) -> str:
        """What a checkpoint must have been written with to be resumed: the settings and each layer's final bits."""
        return json.dumps(settings | {"final_bits": {q.target: q.final for q in quantizers}}, sort_keys=True)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        quantizers = [q for q in fake_quantizers(gm) if isinstance(q, WeightFakeQuantizer)]
        if not quantizers:
            raise PassError("no weight fake quantizers to train: run insert_fake_quantizers on a recipe that quantizes weights")
        if not ctx.samples:
            raise PassError(f"{self.name} needs calibration samples in the pass context (lowbit.quantize keeps "
                            f"{self.kept_samples} of them for this pass)")
        rank, world = _processes()
        parts = world * self.micro_batches  # this process takes parts rank·m … rank·m + m − 1 of every batch
        samples = [[_part(s, rank * self.micro_batches + j, parts, f"kept sample {i}") for j in range(self.micro_batches)]
                   for i, s in enumerate(ctx.samples)]
        with torch.no_grad(), quantization_disabled(gm):
            targets = [[gm(**part) for part in sample] for sample in samples]
        trained = [p for q in quantizers for p in q.parameters()]
        optimizer = torch.optim.Adam(trained, lr=self.lr)
        steps = self.schedule.steps
        order = np.concatenate([np.random.default_rng(self.seed + epoch).permutation(len(samples))
                                for epoch in range(math.ceil(steps / len(samples)))])
        fingerprint = self._fingerprint(self.settings(), quantizers)
        bits, losses = self._resume(gm, optimizer, fingerprint)
        reference = max((q.final for q in quantizers), key=[q.final for q in quantizers].count)  # the recipe's weight bits
        bar = tqdm(range(len(losses), steps), desc=f"{self.name}", initial=len(losses), total=steps,
                   disable=None if rank == 0 else True, leave=False)
        for step in bar:
            above = self.schedule.above_final(step)
            for q in quantizers:
                q.set_bits(q.final + above)
            i = int(order[step])
            for group in optimizer.param_groups:
                group["lr"] = self.learning_rate(step)
            optimizer.zero_grad()
            loss = 0.0
            for part, target in zip(samples[i], targets[i]):  # gradient accumulation: the mean over equal parts
                part_loss = distillation_loss(gm(**part), target) / self.micro_batches
                part_loss.backward()
                loss = loss + part_loss.detach()
            if world > 1:
                for p in trained:
                    dist.all_reduce(p.grad)
                    p.grad /= world
                dist.all_reduce(loss)
                loss /= world
            optimizer.step()
            bits.append(min(reference + above, 16.0))
            losses.append(float(loss))
            bar.set_postfix(bits=f"{bits[-1]:g}", loss=f"{losses[-1]:.3g}")
            if self.checkpoint_dir and ((step + 1) % self.checkpoint_every == 0 or step + 1 == steps):
                self._save(gm, optimizer, bits, losses, fingerprint)
        ctx.artifacts[HISTORY_ARTIFACT] = TrainingHistory.of(bits, losses, json.dumps(self.settings()))
        return PassResult(gm, modified=True)

    # -- checkpoints ---------------------------------------------------------------------------

    def _checkpoints(self) -> list[Path]:
        return sorted(Path(self.checkpoint_dir).glob("step-*.safetensors"))

    def _save(self, gm: torch.fx.GraphModule, optimizer: torch.optim.Optimizer, bits: list[float], losses: list[float],
              fingerprint: str) -> None:
        if _processes()[0] == 0:
            folder = Path(self.checkpoint_dir)
            folder.mkdir(parents=True, exist_ok=True)
            tensors = {f"quantizers.{k}": v.detach().contiguous() for k, v in getattr(gm, FAKE_QUANTIZERS).state_dict().items()}
            for i, state in optimizer.state_dict()["state"].items():
                tensors |= {f"optimizer.{i}.{k}": v.contiguous() for k, v in state.items()}
            tensors |= {"history.bits": torch.tensor(bits), "history.loss": torch.tensor(losses)}
            path = folder / f"step-{len(losses):07d}.safetensors"
            save_file(tensors, str(path.with_suffix(".tmp")), metadata={"run": fingerprint})
            path.with_suffix(".tmp").replace(path)  # a run killed while writing leaves the previous checkpoint whole
            for old in self._checkpoints()[:-_KEEP_CHECKPOINTS]:
                old.unlink()
        if _processes()[1] > 1:
            dist.barrier()

    def _resume(self, gm: torch.fx.GraphModule, optimizer: torch.optim.Optimizer, fingerprint: str) -> tuple[list[float], list[float]]:
        """(bits, losses) so far: empty, or those of the latest checkpoint, whose state is loaded."""
        found = self._checkpoints() if self.checkpoint_dir else []
        if not found:
            return [], []
        with safe_open(str(found[-1]), "pt") as f:
            written = (f.metadata() or {}).get("run")
        if written != fingerprint:
            raise PassError(f"the checkpoint {found[-1]} was written by a run with other settings or layers ({written}; this "
                            f"run: {fingerprint}): remove it, or give another checkpoint folder")
        tensors = load_file(str(found[-1]))
        getattr(gm, FAKE_QUANTIZERS).load_state_dict(
            {k.removeprefix("quantizers."): v for k, v in tensors.items() if k.startswith("quantizers.")})
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
        return tensors["history.bits"].tolist(), tensors["history.loss"].tolist()
