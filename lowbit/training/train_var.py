"""Train the project's VAR on the digits: the tokenizer first, then the transformer.

`python -m lowbit.training.train var-tokenizer` then `... train var`. Both use the reference
model's 80/20 split (train split only), fixed seeds, 2 CPU threads and a wall-clock budget
(default 6 + 20 minutes), so the pair reruns on a 2-core CPU in about half an hour. Each writes
its safetensors and a JSON with the config and the metrics reached; the transformer's JSON holds
the harness's scores of its samples at the pinned protocol (lowbit.models.var.PROTOCOL).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from lowbit.evaluation.harness import evaluate
from lowbit.models import digits
from lowbit.models.classifier import load_classifier
from lowbit.training.steps import learning_rate, optimizer_step, shift
from lowbit.models.var import (PROTOCOL, TOKENIZER_WEIGHTS, VAR, MultiScaleVQ, TokenizerConfig, VARConfig, VARStep,
                               load_tokenizer, make_sampler)

__all__ = ["train_tokenizer", "train_var"]


def train_tokenizer(minutes: float = 6.0, batch: int = 64, lr: float = 2e-3, restart_every: int = 200) -> tuple[dict, dict]:
    """Reconstruction + VQ loss; codebook entries unused over ``restart_every`` steps are
    re-seeded from encoder outputs (dead-code restarts keep the whole vocabulary in use)."""
    x, _ = digits.load_split("train")
    xh, yh = digits.load_split("heldout")
    config = TokenizerConfig()
    model = MultiScaleVQ(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    used = torch.zeros(config.vocab_size, dtype=torch.bool)
    budget, start, step = minutes * 60.0, time.time(), 0
    while (progress := (time.time() - start) / budget) < 1.0:
        images = shift(x[torch.randint(0, len(x), (batch,))])
        f = model.encoder(images)
        indices, f_hat, vq_loss = model.quantize(f)
        loss = F.mse_loss(model.decoder(f_hat), images) + vq_loss
        optimizer_step(model, opt, loss, learning_rate(lr, step, progress), step)
        used[torch.cat([i.reshape(-1) for i in indices])] = True
        step += 1
        if step % restart_every == 0 and progress < 0.8:
            dead = (~used).nonzero()[:, 0]
            if len(dead):
                pool = f.detach().permute(0, 2, 3, 1).reshape(-1, config.latent_channels)
                with torch.no_grad():
                    model.embedding.weight[dead] = pool[torch.randint(0, len(pool), (len(dead),))] * 0.5
            used[:] = False
        if step % 200 == 0:
            print(f"tokenizer step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    model.eval()
    with torch.no_grad():
        recon = model.decode_indices(model.encode(xh))
        codes = torch.cat([i.reshape(-1) for i in model.encode(x)]).unique().numel()
        accuracy = (load_classifier().logits(recon).argmax(1) == yh).float().mean().item()
    metrics = {"heldout_recon_mse": F.mse_loss(recon, xh).item(), "heldout_recon_classifier_accuracy": accuracy,
               "codes_used": codes, "steps": step, "train_seconds": round(time.time() - start, 1)}
    print(metrics, flush=True)
    return model.state_dict(), {"config": {"model": config.to_dict(), "batch": batch, "lr": lr, "minutes": minutes},
                                "metrics": metrics}


def train_var(minutes: float = 20.0, batch: int = 64, lr: float = 1e-3, ema_decay: float = 0.999, p_uncond: float = 0.1,
              eval_samples: int = 200) -> tuple[dict, dict]:
    """Teacher-forced cross-entropy over every scale's tokens under the block-causal mask, with
    class dropout ``p_uncond`` (the null class trains the CFG branch); the EMA weights ship."""
    tokenizer = load_tokenizer(TOKENIZER_WEIGHTS)
    x, y = digits.load_split("train")
    config = VARConfig(vocab_size=tokenizer.config.vocab_size, latent_channels=tokenizer.config.latent_channels,
                       patch_nums=tokenizer.config.patch_nums)
    model = VAR(config).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    budget, start, step, losses = minutes * 60.0, time.time(), 0, []
    while (progress := (time.time() - start) / budget) < 1.0:
        idx = torch.randint(0, len(x), (batch,))
        with torch.no_grad():
            indices = tokenizer.encode(shift(x[idx]))
            inputs = tokenizer.teacher_inputs(indices)
        labels = torch.where(torch.rand(batch) < p_uncond, model.null_class, y[idx])
        logits = model(labels, inputs)
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), torch.cat(indices, dim=1).reshape(-1))
        optimizer_step(model, opt, loss, learning_rate(lr, step, progress), step, clip=2.0, ema=ema, ema_decay=ema_decay)
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            print(f"var step {step} loss {sum(losses[-100:]) / 100:.4f} {time.time() - start:.0f}s", flush=True)
    train_seconds = time.time() - start
    result = evaluate(make_sampler(VARStep(ema), ema, tokenizer), n_samples=eval_samples, seed=0)
    info = {"config": {"model": config.to_dict(), "batch": batch, "lr": lr, "ema_decay": ema_decay, "p_uncond": p_uncond,
                       "minutes": minutes, "steps": step, "protocol": vars(PROTOCOL)},
            "metrics": {"final_loss_mean_last_100": sum(losses[-100:]) / len(losses[-100:]),
                        "train_seconds": round(train_seconds, 1), f"eval_{eval_samples}": result.metrics()}}
    print(info["metrics"], flush=True)
    return ema.state_dict(), info
