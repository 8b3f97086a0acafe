"""One training loop for every stage: base CLIP, base LM, stage 1 and stage 2.

- data parallel under torchrun (DDP; gloo on CPU, nccl on CUDA) with the same arithmetic as one
  process: every step sees the same global batch, and the loss is the sum over its tokens
  divided by the global token count, so 2 processes give the 1-process loss up to rounding;
  or, with `fsdp`, FSDP2 (`fully_shard`: parameters, gradients and optimizer state sharded over
  the processes, one unit per transformer layer), the same arithmetic again;
- gradient accumulation (micro-batches) and optional gradient checkpointing;
- bf16 autocast on CUDA, and on CPUs with native bf16 matmuls (AVX512-BF16 or AMX: 2-3x faster
  than fp32 there; elsewhere bf16 is emulated and slower, so "auto" keeps fp32);
- AdamW without weight decay, linear warm-up then cosine decay (the paper's recipe);
- resume: a checkpoint holds the model, optimizer, scheduler, step (which fixes the data
  position: each epoch's order is a permutation seeded by seed + epoch) and RNG states, and an
  interrupted run resumed from it ends with the same weights as an uninterrupted one;
- checkpoints are written to a temp directory and swapped in, never half-written;
- metrics to JSONL, a PNG loss curve, progress bars.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from llava_rt.checkpoint import atomic_directory


@dataclass
class TrainConfig:
    out_dir: str
    lr: float
    batch_size: int  # global, across processes and accumulation
    micro_batch_size: int
    epochs: float = 1.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_beta2: float = 0.999  # AdamW's second-moment decay (LLaVA's, transformers' default)
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 0  # steps between resumable checkpoints; 0 = only at the end
    log_every: int = 10
    gradient_checkpointing: bool = False
    stop_after: int = 0  # stop (resumably) after this many steps of this run; 0 = run to the end
    precision: str = "auto"  # auto | bf16 | fp32: bf16 autocast (fp32 master weights) or none
    compile: bool = False  # torch.compile the forward and backward (dynamic shapes: batches vary in length)
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP (the module doc)
    # With `lengths` given to train(): batches of similar length (the LLaVA repo's group_by_length). Either
    # way each process sorts its share of a batch by length before cutting micro-batches, so a short
    # example is padded only to its neighbours; the gradient is the same (one sum over the batch).
    group_by_length: bool = True
    desc: str = "training"


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistInfo(rank, world, device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_for(precision: str, device: torch.device):
    """The bf16 autocast context `precision` asks for on `device` ("auto": CUDA, or a CPU with native bf16)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision {precision!r}: choose auto, bf16 or fp32")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()) else "fp32"
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _save_state(path: Path, model, optim_state: dict, scheduler, step: int, cfg: TrainConfig, save_model: Callable) -> None:
    tmp, commit = atomic_directory(path)
    save_model(model, tmp / "model")
    torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    py_state = random.getstate()
    (tmp / "trainer_state.json").write_text(json.dumps({
        "step": step, "config": asdict(cfg), "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
    }))
    commit()


def _load_state(path: Path, optimizer, scheduler, sharded_model=None) -> int:
    state = json.loads((path / "trainer_state.json").read_text())
    # weights_only: tensors and plain containers, never arbitrary pickled objects.
    blob = torch.load(path / "optimizer.pt", weights_only=True)
    if sharded_model is not None:  # FSDP: the full state, keyed by parameter name; each rank keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(sharded_model, optimizer, blob["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    v, internal, gauss = state["python_rng"]
    random.setstate((v, tuple(internal), gauss))
    return state["step"]


def _fully_shard(model: torch.nn.Module, params: list) -> list:
    """FSDP2 in place: a unit per layer of every ModuleList (the transformer blocks), then the rest
    (embeddings, projector, head: tied weights stay in one unit). fully_shard swaps in new sharded
    parameters, so `params` (a list or AdamW groups) is returned rewritten to them, by name."""
    from torch.distributed.fsdp import fully_shard

    names = {id(p): n for n, p in model.named_parameters()}
    for module in list(model.modules()):
        if isinstance(module, torch.nn.ModuleList):
            for layer in module:
                fully_shard(layer)
    fully_shard(model)
    by_name = dict(model.named_parameters())
    remap = lambda ps: [by_name[names[id(p)]] for p in ps]  # noqa: E731
    return [{**g, "params": remap(g["params"])} for g in params] if isinstance(params[0], dict) else remap(params)


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model's structure with its parameters on the meta device (no memory): under FSDP rank 0
    loads the gathered full weights into it, to save them in the usual layout."""
    memo = {id(p): torch.nn.Parameter(p.detach().to("meta"), p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _gather_full(model: torch.nn.Module, optimizer, template: torch.nn.Module | None) -> tuple:
    """FSDP, a collective (every rank calls it): the full weights loaded into `template` and the full
    optimizer state, on rank 0 (None and {} elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if template is not None:
        template.load_state_dict(weights, assign=True)
    return template, optim_state


def batch_indices(n: int, step: int, steps_per_epoch: int, batch_size: int, seed: int,
                  lengths: np.ndarray | None = None) -> np.ndarray:
    """The examples of global batch `step`: a pure function of (seed, step), which is what makes resume exact.

    With `lengths`, batches are grouped by length (like the LLaVA repo's group_by_length): the
    epoch's shuffled order is cut into mega-batches of 16 batches, each sorted by length and cut
    into batches, and the batches shuffled; less padding, same randomness across epochs.
    """
    epoch, offset = divmod(step, steps_per_epoch)
    rng = np.random.default_rng(seed + epoch)
    order = rng.permutation(n)
    if lengths is not None:
        mega = batch_size * 16
        batches = []
        for i in range(0, steps_per_epoch * batch_size, mega):
            chunk = order[i : i + mega]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
        batches = [b for b in batches if len(b) == batch_size]
        return batches[rng.permutation(len(batches))[offset]]
    return order[offset * batch_size : (offset + 1) * batch_size]


def train(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter] | list[dict],
    n_examples: int,
    loss_fn: Callable[[torch.nn.Module, np.ndarray], tuple[torch.Tensor, int]],
    count_fn: Callable[[np.ndarray], int],
    cfg: TrainConfig,
    save_model: Callable[[torch.nn.Module, Path], None],
    dist_info: DistInfo | None = None,
    resume_from: Path | None = None,
    lengths: np.ndarray | None = None,
    final_dir: Path | None = None,
) -> dict:
    """Train `params` of `model` (parameters, or AdamW param groups where one needs its own lr).
    loss_fn(model, indices) -> (summed loss, count) over those examples; count_fn(indices) -> the
    same count without a forward, used to normalise the global batch.
    Returns the summary (final loss, steps, seconds). Writes out_dir/checkpoint-last/, metrics, and
    when the run finishes and `final_dir` is given, the model there (save_model)."""
    d = dist_info or DistInfo()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    fsdp = cfg.fsdp and d.world > 1
    if fsdp and cfg.compile:
        raise ValueError("--fsdp with --compile is not supported yet: drop one of them")
    wrapped, template = model, None
    if fsdp:
        template = _meta_copy(model) if d.main else None
        params = _fully_shard(model, params)
    elif d.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    if cfg.compile:  # after DDP, as torch's DDP + compile docs ask; no_sync and the weights stay the model's
        wrapped = torch.compile(wrapped, dynamic=True)
    flat = [p for g in params for p in g["params"]] if isinstance(params[0], dict) else params
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, cfg.adam_beta2), eps=1e-8)
    steps_per_epoch = max(1, n_examples // cfg.batch_size)  # drop the last partial batch, as the global batch must be full
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    warmup = max(1, int(round(cfg.warmup_ratio * total)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total))
    start = 0
    last = out / "checkpoint-last"
    if resume_from is not None:
        start = _load_state(resume_from, optimizer, scheduler, model if fsdp else None)
    per_rank = cfg.batch_size // d.world
    if per_rank * d.world != cfg.batch_size or per_rank % cfg.micro_batch_size:
        raise ValueError(
            f"batch_size {cfg.batch_size} must split evenly over {d.world} processes and micro-batches of "
            f"{cfg.micro_batch_size}"
        )
    metrics_path = out / "metrics.jsonl"
    if start == 0 and d.main:
        metrics_path.write_text("")
    autocast = autocast_for(cfg.precision, d.device)
    bar = tqdm(total=total, initial=start, desc=cfg.desc, disable=not d.main, dynamic_ncols=True)
    t0, loss_value, step = time.time(), float("nan"), start
    end = total if not cfg.stop_after else min(total, start + cfg.stop_after)
    for step in range(start, end):
        idx = batch_indices(n_examples, step, steps_per_epoch, cfg.batch_size, cfg.seed,
                            lengths if cfg.group_by_length else None)
        global_count = max(1, count_fn(idx))
        mine = idx[d.rank * per_rank : (d.rank + 1) * per_rank]
        if lengths is not None:
            mine = mine[np.argsort(lengths[mine], kind="stable")]
        micro = [mine[i : i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
        loss_sum = torch.zeros((), device=d.device)
        for k, part in enumerate(micro):
            sync = k == len(micro) - 1 or d.world == 1
            if fsdp:
                model.set_requires_gradient_sync(sync)
            ctx = wrapped.no_sync() if (d.world > 1 and not sync and not fsdp) else nullcontext()
            with ctx, autocast:
                total_loss, _ = loss_fn(wrapped, part)
                # DDP and FSDP average gradients over processes; scale by world so the result is the global sum / count.
                (total_loss * d.world / global_count).backward()
            loss_sum += total_loss.detach().float()
        if d.world > 1:
            dist.all_reduce(loss_sum)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(flat, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss_sum.item() / global_count
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if d.main and (step % cfg.log_every == 0 or step == total - 1):
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                                    "epoch": (step + 1) / steps_per_epoch, "elapsed_s": round(time.time() - t0, 2)}) + "\n")
        done = step + 1
        if (cfg.save_every and done % cfg.save_every == 0) or done == end:
            full, optim_state = _gather_full(model, optimizer, template) if fsdp else (model, optimizer.state_dict())
            if d.main:
                _save_state(last, full, optim_state, scheduler, done, cfg, save_model)
        if d.world > 1:
            dist.barrier()
    bar.close()
    finished = step + 1 >= total
    if fsdp and finished and final_dir is not None and start >= end:  # resumed a finished run: nothing gathered yet
        _gather_full(model, optimizer, template)
    if d.main:
        plot_loss(metrics_path, out / "loss.png", cfg.desc)
        if finished and final_dir is not None:
            save_model(template if fsdp else model, final_dir)
    return {"final_loss": loss_value, "steps": step + 1 - start, "total_steps": total, "seconds": time.time() - t0,
            "finished": finished}


def plot_loss(metrics_path: Path, png: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the PNG is a convenience; metrics.jsonl has the numbers
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
