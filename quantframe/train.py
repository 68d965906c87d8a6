"""Train a small byte-level Llama on the Python standard library's own source, dense or quantized.

Read top to bottom: scheme registry, config, model, data, ``train``. It is nanoGPT's train.py
without the globals: the config is a dataclass and the loop is a function, so a test can run it
for three steps and the CLI can run each scheme in its own process.

Example::

    from quantframe.train import TrainConfig, train
    result = train(TrainConfig(quantize="int8-qt", steps=100))
    print(result.final_val_loss)

Fine-tuning adapters over a frozen NF4 base starts from a dense run's weights::

    train(TrainConfig(quantize="none", save="dense.pt"))
    train(TrainConfig(quantize="nf4-dora", init_from="dense.pt"))
"""

from __future__ import annotations

import math
import os
import resource
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantframe.api import QuantConfig, quantize_, summary
from quantframe.int8_mixed_precision import int8_mixed_precision_training
from quantframe.int8_training import int8_weight_only_quantized_training
from quantframe.nf4 import nf4_weight_only
from quantframe.nn.dora import DoRAConfig, apply_adapters_, dora, lora
from quantframe.optim import AdamW, AdamW8bit
from quantframe.tensor import QuantTensor
from quantframe.ternary import bitnet_training, convert_bitnet_to_ternary_

__all__ = [
    "SCHEMES", "CONVERSIONS", "OPTIMIZERS", "TrainConfig", "TrainResult", "ByteLM", "ByteData", "load_stdlib_bytes",
    "quantize_filter", "blocks_filter", "SCHEME_FILTERS", "get_lr", "lm_loss", "estimate_loss", "weight_bytes",
    "load_dense_state_", "setup", "train",
]  # fmt: skip

VOCAB = 256  # byte-level: every byte is a token, no tokenizer to ship

# NF4 blocks of 32 with 32 block scales per scaler (QLoRA: 64 and 256), so that every Linear of
# these small models (in_features a multiple of 32, numel a multiple of 1024) takes an NF4 base.
_NF4_BASE = nf4_weight_only(block_size=32, scaler_block_size=32)

# Scheme name -> config factory (None: train dense). `--quantize` / `--compare` choices are the keys.
# A DoRAConfig fine-tunes adapters over a frozen quantized base; it needs `init_from` (see TrainConfig).
SCHEMES: dict[str, Callable[[], QuantConfig | None]] = {
    "none": lambda: None,
    "int8-qt": int8_weight_only_quantized_training,
    "int8-mp": int8_mixed_precision_training,  # INT8 matmuls, float weights
    "int8-mp-w8": lambda: int8_mixed_precision_training(int8_weights=True),  # INT8 matmuls and weights
    "bitnet": bitnet_training,  # ternary x INT8 forward (STE) on float master weights
    "nf4-dora": lambda: dora(rank=8, alpha=16, base=_NF4_BASE),  # QDoRA: only adapters + magnitudes train
    "nf4-lora": lambda: lora(rank=8, alpha=16, base=_NF4_BASE),  # QLoRA: only adapters train
}

# Scheme name -> the conversion to its inference format, applied after the last step; the run
# reports the loss before and after it (TrainResult.converted_*).
CONVERSIONS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "bitnet": convert_bitnet_to_ternary_,  # packed 2-bit TernaryWeight, the same forward
}

# Optimizer name -> class; both do fp32 math (AdamW8bit keeps its moments in 8 bits).
OPTIMIZERS = {"adamw": AdamW, "adamw8bit": AdamW8bit}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on; change it with ``dataclasses.replace``."""

    # model
    dim: int = 128  # residual width D
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # attention heads; dim / n_heads must be even (RoPE rotates pairs)
    ffn_hidden: int | None = None  # SwiGLU hidden width; None: 8/3 * dim rounded up to a multiple of 32
    seq_len: int = 128  # context length T in bytes
    # data
    data_bytes: int = 4 * 2**20  # read the first N bytes of the sorted stdlib sources
    batch_size: int = 32  # sequences per step
    # optimization
    steps: int = 450  # optimizer steps
    lr: float = 3e-3  # peak learning rate (after warmup); cosine-decays to lr / 10
    warmup_steps: int = 30  # linear warmup from lr / warmup_steps to lr
    weight_decay: float = 0.1  # AdamW decoupled decay, on 2-D weights only (not norms)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    seed: int = 0  # model init, batch sampling and stochastic rounding
    # what to compare
    quantize: str = "int8-qt"  # a key of SCHEMES; "none" trains dense fp32
    optim: str = "adamw"  # a key of OPTIMIZERS
    device: str = "auto"  # "auto": cuda if available, else cpu
    threads: int = 0  # CPU intra-op threads for this run; 0: torch's default (one per core)
    init_from: str | None = None  # dense state_dict (a run with save=...) loaded before quantizing
    save: str | None = None  # write the trained model's state_dict here (before any conversion)
    # evaluation and output
    eval_interval: int = 100  # estimate train/val loss every N steps (and always at the end); 0: only at the end
    eval_batches: int = 8  # batches per loss estimate (the same windows every time)
    out_dir: str = "runs"  # where the CLI writes plots

    def __post_init__(self):
        if self.quantize not in SCHEMES:
            raise ValueError(f"TrainConfig: quantize={self.quantize!r} is not a scheme; valid: {', '.join(SCHEMES)}")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"TrainConfig: optim={self.optim!r} is not an optimizer; valid: {', '.join(OPTIMIZERS)}")
        positive = ("dim", "n_layers", "n_heads", "seq_len", "data_bytes", "batch_size", "steps", "eval_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name}={getattr(self, name)} must be >= 1")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"TrainConfig: dim={self.dim} must split into n_heads={self.n_heads} heads of even size (RoPE)"
            )
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            raise ValueError(f"TrainConfig: ffn_hidden={self.ffn_hidden} must be >= 1 or None")
        if not self.lr > 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(
                f"TrainConfig: need lr > 0, warmup_steps >= 0, weight_decay >= 0, grad_clip >= 0; got lr={self.lr}, "
                f"warmup_steps={self.warmup_steps}, weight_decay={self.weight_decay}, grad_clip={self.grad_clip}"
            )
        if isinstance(SCHEMES[self.quantize](), DoRAConfig) and self.init_from is None:
            raise ValueError(
                f"TrainConfig: quantize={self.quantize!r} fine-tunes adapters over a frozen base, so it needs "
                f"init_from (a dense state_dict: first train quantize='none' with save=PATH)"
            )
        if self.eval_interval < 0 or self.threads < 0:
            raise ValueError(
                f"TrainConfig: eval_interval={self.eval_interval} and threads={self.threads} must be >= 0"
            )


# ---- model: a small Llama (RMSNorm, RoPE attention, SwiGLU, untied head) ---------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, D]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin [T, head_dim / 2]: the rotation angle of each position and frequency."""
    freqs = base ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the (first half, second half) pairs of each head; x: [B, H, T, hd], cos/sin: [T, hd/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)  # one matmul for q, k, v
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # x: [B, T, D]
        B, T, D = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # [B, H, T, hd]
        q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, hd]
        return self.wo(y.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # value
        self.w2 = nn.Linear(hidden, dim, bias=False)  # back to the residual stream

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, D] -> [B, T, D]
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, hidden: int):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(dim), Attention(dim, n_heads)
        self.ffn_norm, self.ffn = RMSNorm(dim), SwiGLU(dim, hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # x: [B, T, D]
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class ByteLM(nn.Module):
    """Byte-level Llama: tokens [B, T] int64 -> logits [B, T, 256]."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        hidden = cfg.ffn_hidden or 32 * math.ceil(8 * cfg.dim / 3 / 32)
        self.tok_emb = nn.Embedding(VOCAB, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg.dim, cfg.n_heads, hidden) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, VOCAB, bias=False)  # untied: the embedding stays dense
        cos, sin = rope_tables(cfg.seq_len, cfg.dim // cfg.n_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2 init; the projections that write into the residual stream are scaled down
                # by sqrt(2 * n_layers) so the stream's variance does not grow with depth.
                residual = name.endswith(("wo.weight", "w2.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers) if residual else 0.02)

    def forward(self, idx: Tensor) -> Tensor:  # idx: [B, T]
        x = self.tok_emb(idx)  # [B, T, D]
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        return self.lm_head(self.norm(x))  # [B, T, 256]


def quantize_filter(module: nn.Module, fqn: str) -> bool:
    """The Linears inside the blocks and the lm_head; the embedding (a lookup) stays dense."""
    return isinstance(module, nn.Linear) and (fqn.startswith("layers.") or fqn == "lm_head")


def blocks_filter(module: nn.Module, fqn: str) -> bool:
    """The Linears inside the blocks only: BitNet b1.58 replaces those with BitLinear and keeps the
    embedding and the output head in high precision (on the default CPU run a ternary head cost
    val loss 1.765 against 1.523 with a dense one; dense fp32: 1.542)."""
    return isinstance(module, nn.Linear) and fqn.startswith("layers.")


# Scheme name -> which modules it quantizes (quantize_filter unless listed).
SCHEME_FILTERS: dict[str, Callable[[nn.Module, str], bool]] = {"bitnet": blocks_filter}


# ---- data: the standard library's .py files, as bytes -------------------------------------------
# Third-party code, test fixtures and generated tables (codec maps, pydoc topics) are left out:
# the tables are so repetitive they would make the loss look better than the model is.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3",
              "encodings", "pydoc_data", "turtledemo"}  # fmt: skip


def load_stdlib_bytes(max_bytes: int) -> Tensor:
    """The stdlib's .py sources, sorted by path, concatenated and cut at ``max_bytes``: uint8 [N]."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        files += [Path(dirpath, f).relative_to(root) for f in filenames if f.endswith(".py")]
    chunks, total = [], 0
    for rel in sorted(files, key=lambda p: p.as_posix()):  # sorted: the same bytes on every run
        chunk = (root / rel).read_bytes()[: max_bytes - total]
        chunks.append(chunk)
        total += len(chunk)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


class ByteData:
    """Train/val split (first 90% / last 10%) of the stdlib bytes; random windows per batch."""

    def __init__(self, cfg: TrainConfig, data: Tensor | None = None):
        data = load_stdlib_bytes(cfg.data_bytes) if data is None else data
        if len(data) < 10 * (cfg.seq_len + 1):
            raise ValueError(f"ByteData: {len(data)} bytes of text is too little for seq_len={cfg.seq_len}")
        n = int(0.9 * len(data))
        self.splits = {"train": data[:n], "val": data[n:]}
        self.batch_size, self.seq_len = cfg.batch_size, cfg.seq_len
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def get_batch(self, split: str, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Inputs x and next-byte targets y, both int64 [B, T], from random windows of ``split``."""
        if split not in self.splits:
            raise ValueError(f"ByteData.get_batch: split={split!r}; expected 'train' or 'val'")
        data = self.splits[split]
        starts = torch.randint(len(data) - self.seq_len, (self.batch_size,), generator=generator or self.generator)
        windows = data[starts[:, None] + torch.arange(self.seq_len + 1)].long()  # [B, T + 1]
        return windows[:, :-1], windows[:, 1:]


# ---- training -----------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What one run reports; plain data, so it crosses process boundaries (the CLI spawns runs)."""

    scheme: str
    losses: list[float]  # training loss at every step
    eval_losses: list[tuple[int, float, float]]  # (step, train loss, val loss) at each evaluation
    final_train_loss: float  # loss estimate on the train split after the last step
    final_val_loss: float  # loss estimate on the val split after the last step
    tokens_per_s: float  # training tokens per second from the second step on, evaluation excluded
    peak_memory_bytes: int  # see peak_memory_kind
    peak_memory_kind: str  # "peak RSS" (CPU: the whole process) or "peak CUDA alloc"
    weight_bytes: int  # parameter bytes: packed bytes for quantized weights
    wall_time_s: float  # the whole call: data, model, training, evaluation
    summary: str = field(default="", repr=False)  # quantframe.summary(model)
    # schemes in CONVERSIONS: train/val loss after converting to the inference format (the final_*
    # losses are before it) and the converted model's weight bytes; None for other schemes
    converted_train_loss: float | None = None
    converted_val_loss: float | None = None
    converted_weight_bytes: int | None = None


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr``, then cosine decay to ``cfg.lr / 10`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    min_lr = cfg.lr / 10
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - min_lr)


def weight_bytes(params: Iterable[Tensor]) -> int:
    """Bytes the parameters hold: packed bytes for a QuantTensor, numel * element_size otherwise."""
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.nbytes_packed if isinstance(p, QuantTensor) else p.numel() * p.element_size()
    return total


def lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy in fp32, whatever the model's dtype (a bf16 loss is rounded in steps of
    2**-7, ~0.5% at loss 1.5: coarser than the differences between formats)."""
    logits = model(x)  # [B, T, 256]
    return F.cross_entropy(logits.view(-1, VOCAB).float(), y.reshape(-1))


@torch.no_grad()
def estimate_loss(model: nn.Module, data: ByteData, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Mean loss over ``cfg.eval_batches`` batches per split, the same windows at every call."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # fixed windows: evaluations compare like with like
        losses = [lm_loss(model, *(t.to(device) for t in data.get_batch(split, gen))) for _ in range(cfg.eval_batches)]
        out[split] = torch.stack(losses).mean().item()
    model.train()
    return out


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "peak CUDA alloc"
    # ru_maxrss is KiB on Linux, bytes on macOS; it covers the whole process, so a fair
    # comparison runs each scheme in a fresh process (the CLI spawns one per run).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "peak RSS"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # timings must wait for the queued kernels


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train ``ByteLM`` as ``cfg`` says and report losses, speed and memory.

    Every scheme uses the same optimizer, ``cfg.optim`` (default ``quantframe.optim.AdamW``: for
    quantized weights one dequantize, fp32 update, one stochastic-rounding requantize per step), so
    runs differ only in the weights.
    """
    threads = torch.get_num_threads()
    if cfg.threads:
        # One thread wins on a busy machine: with more threads than free cores, every parallel
        # op waits at a barrier for a descheduled thread, and small models get ~10x slower.
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, progress)
    finally:
        torch.set_num_threads(threads)  # process-wide setting: leave it as we found it


def load_dense_state_(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a dense ``state_dict`` (saved by a ``quantize="none"`` run with ``save``) into ``model``.

    Raises ``TypeError`` when the file is not a dict, ``ValueError`` when it holds quantized or
    adapter tensors or its keys or shapes differ from the model's (a checkpoint of another size).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"init_from={str(path)!r}: expected a state_dict, got {type(state).__name__}")
    quantized = [k for k, v in state.items() if type(v) is not torch.Tensor]
    if quantized:
        raise ValueError(
            f"init_from={str(path)!r}: {quantized[0]} is a {type(state[quantized[0]]).__name__}, not a plain tensor; "
            f"init_from takes the state_dict of a dense run (quantize='none' with save=...)"
        )
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state] + [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
                 for k, v in own.items() if k in state and state[k].shape != v.shape]  # fmt: skip
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(
            f"init_from={str(path)!r} does not fit this config's model: {'; '.join(problems[:3])}{more}; "
            f"use the dim/layers/heads/ffn_hidden of the run that saved it"
        )
    model.load_state_dict(state)


def setup(cfg: TrainConfig) -> tuple[torch.device, ByteData, ByteLM, AdamW]:
    """Device, data, the (quantized) model and its optimizer, all seeded from ``cfg.seed``.

    ``cfg.init_from`` loads dense weights before quantizing. A DoRAConfig scheme swaps the selected
    Linears for :class:`DoRALinear` (frozen quantized base) and freezes everything else, so the
    optimizer sees only ``lora_A``, ``lora_B`` and ``magnitude``.
    """
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 model; TF32 tensor cores for the dense matmuls
    # fp32 weights and activations everywhere: bf16 matmuls on CPU are slower than fp32 ones.
    torch.manual_seed(cfg.seed)  # the same float init for every scheme, and the SR noise sequence
    data = ByteData(cfg)
    model = ByteLM(cfg)
    if cfg.init_from is not None:
        load_dense_state_(model, cfg.init_from)
    model = model.to(device)
    qconfig = SCHEMES[cfg.quantize]()
    selected = SCHEME_FILTERS.get(cfg.quantize, quantize_filter)
    if isinstance(qconfig, DoRAConfig):
        model.requires_grad_(False)  # embedding, norms and skipped Linears stay as loaded
        apply_adapters_(model, qconfig, filter_fn=selected)  # new adapters require grad
    elif qconfig is not None:
        quantize_(model, qconfig, filter_fn=selected)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return device, data, model, OPTIMIZERS[cfg.optim](groups, lr=cfg.lr, betas=(0.9, 0.95))


def _train(cfg: TrainConfig, progress: bool) -> TrainResult:
    from tqdm.auto import tqdm

    # Every scheme imports the kernel modules (and with them triton, ~125 MiB), so that peak RSS
    # compares the training itself and not which modules one run happened to load.
    import quantframe.kernels.int8_rowwise  # noqa: F401
    import quantframe.kernels.int8_weight_mm  # noqa: F401

    t_start = time.perf_counter()
    device, data, model, opt = setup(cfg)
    step_losses = torch.zeros(cfg.steps, device=device)
    eval_losses: list[tuple[int, float, float]] = []
    if cfg.init_from is not None:  # a fine-tune: where it starts from is part of the result
        est = estimate_loss(model, data, cfg, device)
        eval_losses.append((0, est["train"], est["val"]))
    # tokens/s is timed from the second step: the first pays one-off costs (lazy kernel imports,
    # Triton compiles on CUDA, allocator warm-up) that would swamp a short run.
    timed_steps = max(1, cfg.steps - 1)
    bar = tqdm(range(cfg.steps), desc=cfg.quantize, disable=not progress, dynamic_ncols=True)
    for step in bar:
        if step == cfg.steps - timed_steps:
            _sync(device)
            t_train, eval_time = time.perf_counter(), 0.0
        lr = get_lr(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = (t.to(device, non_blocking=True) for t in data.get_batch("train"))
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:  # weight grads are plain tensors, quantized weight or not (frozen: None)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()  # quantized weights: dequantize, AdamW in fp32, requantize once (stochastic rounding)
        step_losses[step] = loss.detach()  # no .item() here: on CUDA that would sync every step
        if step % 10 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        if cfg.eval_interval and (step + 1) % cfg.eval_interval == 0 and step + 1 < cfg.steps:
            t_eval = time.perf_counter()
            est = estimate_loss(model, data, cfg, device)
            eval_losses.append((step + 1, est["train"], est["val"]))
            eval_time += time.perf_counter() - t_eval
    bar.close()
    _sync(device)
    train_time = time.perf_counter() - t_train - eval_time

    est = estimate_loss(model, data, cfg, device)
    eval_losses.append((cfg.steps, est["train"], est["val"]))
    if cfg.save is not None:
        Path(cfg.save).parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cfg.save)
    trained_bytes, trained_summary = weight_bytes(model.parameters()), summary(model)
    converted: dict[str, float | int | None] = dict.fromkeys(("train", "val", "bytes"))
    if cfg.quantize in CONVERSIONS:
        CONVERSIONS[cfg.quantize](model)
        after = estimate_loss(model, data, cfg, device)
        converted = {"train": after["train"], "val": after["val"], "bytes": weight_bytes(model.parameters())}
    peak, peak_kind = _peak_memory(device)
    return TrainResult(
        scheme=cfg.quantize,
        losses=step_losses.tolist(),
        eval_losses=eval_losses,
        final_train_loss=est["train"],
        final_val_loss=est["val"],
        tokens_per_s=timed_steps * cfg.batch_size * cfg.seq_len / train_time,
        peak_memory_bytes=peak,
        peak_memory_kind=peak_kind,
        weight_bytes=trained_bytes,
        wall_time_s=time.perf_counter() - t_start,
        summary=trained_summary,
        converted_train_loss=converted["train"],
        converted_val_loss=converted["val"],
        converted_weight_bytes=converted["bytes"],
    )
