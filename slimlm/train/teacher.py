"""The teacher's side of distillation: its outputs on the fly, or once per training token into a cache.

The cache holds, per position, the teacher's top-k token ids (int32) and log-probabilities (float32) at the
distillation temperature, as two `.npy` files memory-mapped on disk (written to a temp name, fsynced,
renamed). Its name carries the teacher's and the data's fingerprints, k and T, so a cache is only reused for
the same teacher, tokens and settings. Its cost in quality against full logits is measured by bench/heal.py
(Minitron saw truncating to <=100 logits hurt).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..io import fsync_path
from .losses import head_topk_targets, kl_full, topk_targets


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape and bytes (tied weights once)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def head_input(module: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden state h as the LM head's forward sees it: through the head's forward pre-hooks
    (quant.activations.emulate's rounding of llama.cpp's activations under QAT --runtime-activations), so a loss
    that runs the head itself (fused_head) computes what the module's logits would."""
    head = module.get_output_embeddings()
    for hook in head._forward_pre_hooks.values():
        r = hook(head, (h,))
        if r is not None:
            h = r[0] if isinstance(r, tuple) else r
    return h


@torch.no_grad()
def fused_head(module: torch.nn.Module) -> torch.Tensor | None:
    """The LM head's weight W when the model's logits are exactly its decoder's last hidden state (through the
    head's pre-hooks: head_input) @ W.T (no bias, soft-capping or logit scale: checked on a few tokens, whatever
    the family, once per module and set of head pre-hooks), else None. The trainer and the teacher's top-k then
    run the head fused with the loss, a chunk of positions at a time (losses.head_kl_topk / head_topk_targets)."""
    head = module.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or head._forward_pre_hooks_with_kwargs \
            or head._forward_hooks:
        return None
    key = tuple(head._forward_pre_hooks)                # a hook added or removed since: checked again
    checked = getattr(module, "_slimlm_fused_head", {})
    ok = checked.get(key)
    if ok is None:
        p = head.weight
        ids = torch.arange(4, device=p.device)[None] % module.config.vocab_size
        with torch.autocast(p.device.type, enabled=False):
            want = module(input_ids=ids, use_cache=False).logits.float()
            h = head_input(module, module.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state)
            ok = bool(torch.allclose(torch.nn.functional.linear(h, p).float(), want, rtol=1e-4, atol=1e-4))
        module._slimlm_fused_head = {**checked, key: ok}
    return head.weight if ok else None


@contextlib.contextmanager
def linears_in_bf16(module: torch.nn.Module, enabled: bool):
    """While inside, the module's Linear weights (those not shared with an embedding: a tied LM head stays) are
    bf16 copies, the fp32 tensors put back on exit. Under bf16 autocast a Linear casts its fp32 weight to bf16 on
    every call (autocast caches casts only for weights that train): for a teacher that never trains, casting once
    per run gives the same bf16 weights, so the same outputs, without re-casting 100M+ weights every step. Only
    for a module that runs under bf16 autocast while inside (its fused-head check is taken first, in fp32)."""
    if not enabled:
        yield
        return
    fused_head(module)
    tied = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    saved = []
    try:
        with torch.no_grad():
            for m in module.modules():
                if isinstance(m, torch.nn.Linear) and id(m.weight) not in tied and m.weight.dtype == torch.float32:
                    saved.append((m, m.weight))
                    m.weight = torch.nn.Parameter(m.weight.detach().to(torch.bfloat16), requires_grad=False)
        yield
    finally:
        for m, w in saved:
            m.weight = w


@torch.no_grad()
def teacher_topk(teacher, ids: torch.Tensor, *, k: int, T: float, device: torch.device,
                 bf16: bool, compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache stores for `ids`: the teacher's top-k token ids (int32) and log-probabilities at T
    (float16), on the CPU. `compiled`: the fused head's chunk kernels compiled (losses.head_topk_targets)."""
    W = fused_head(teacher.module)
    with autocast(device, bf16):
        if W is None:
            i, v = topk_targets(teacher.module(input_ids=ids, use_cache=False).logits, k, T)
        else:
            h = head_input(teacher.module, teacher.module.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state)
            i, v = head_topk_targets(h, W, k, T, compiled=compiled)
    return i.int().cpu(), v.half().cpu()


# the teacher's logits on held-out rows are kept between evaluations (on the CPU, in the dtype they come in) while they
# take at most this much: SmolLM2's 8 x 256 rows are 200 MB in bf16, 400 MB in fp32. The teacher is fixed, so every
# evaluation gives the same number as with a fresh teacher forward
HELDOUT_TEACHER_BYTES = 2**30


def heldout_keep(rows: torch.Tensor, teacher, bytes_per_logit: int) -> list | None:
    """A list for heldout_kl's `keep` when the teacher's logits of `rows` fit HELDOUT_TEACHER_BYTES, else None."""
    vocab = int(teacher.config.get("vocab_size") or 0)
    return [] if rows.numel() * vocab * bytes_per_logit <= HELDOUT_TEACHER_BYTES else None


@torch.no_grad()
def heldout_kl(student_module, teacher_module, rows: torch.Tensor, *, batch: int, device: torch.device,
               bf16: bool, keep: list | None = None) -> float:
    """KL(teacher || student) at T=1 on held-out `rows`, `batch` rows at a time (the full teacher distribution).
    `keep`: a list that holds the teacher's logits of these rows between calls (filled by the first, read by the
    later ones: the same numbers, one teacher forward)."""
    tot = 0.0
    for j, a in enumerate(range(0, rows.shape[0], batch)):
        ids = rows[a:a + batch].to(device)
        with autocast(device, bf16):
            s = student_module(input_ids=ids, use_cache=False).logits
            if keep is not None and j < len(keep):
                t = keep[j].to(device)
            else:
                t = teacher_module(input_ids=ids, use_cache=False).logits
                if keep is not None:
                    keep.append(t.cpu())
        tot += float(kl_full(s, t)) * ids.shape[0]
    return tot / rows.shape[0]


class OnTheFly:
    """The teacher run with every batch: full logits and, when asked, its hidden states."""
    kind = "full"

    def __init__(self, teacher, device: torch.device, bf16: bool, hidden: bool = False):
        self.module, self.device, self.bf16, self.hidden = teacher.module, device, bf16, hidden

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor, ids: torch.Tensor) -> dict:
        with autocast(self.device, self.bf16):
            out = self.module(input_ids=ids, use_cache=False, output_hidden_states=self.hidden)
        return {"logits": out.logits.float(), "hidden": out.hidden_states if self.hidden else None}


class TopKOnTheFly:
    """The teacher's top-k log-probabilities computed with every batch, rounded to exactly what the cache would
    store: for a run that sees each training row at most once, a cache would cost the same teacher forward per
    token and only add its disk, and a duration budget that re-plans to fewer steps would have built it for rows
    never reached."""
    kind = "topk"
    cached = False

    def __init__(self, teacher, *, k: int, T: float, device: torch.device, bf16: bool, compiled: bool = False):
        self.teacher, self.k, self.T, self.device, self.bf16, self.compiled = teacher, k, T, device, bf16, compiled
        # not compiled with the student (--compile): bench/heal.py, AVX2 fp32, measured the compiled student at 142
        # tok/s with an eager teacher and at 106 (the eager rate) with the teacher's decoder compiled too
        self.build_seconds = 0.0

    def __call__(self, rows: torch.Tensor, ids: torch.Tensor) -> dict:
        i, v = teacher_topk(self.teacher, ids, k=self.k, T=self.T, device=self.device, bf16=self.bf16,
                            compiled=self.compiled)
        return {"idx": i.long(), "lt": v.float()}


# tokens per teacher forward while the top-k cache is built. SmolLM2 on 2 Xeon cores with AMX (bf16), teacher
# forward and top-256 per second: 2,480 tokens at 1024 per forward, 2,850-2,950 at 2048, 2,460 at 4096
CACHE_BATCH_TOKENS = 2048


class TopKCache:
    """Top-k log-probabilities of the teacher for the training rows a run uses, memory-mapped from `folder`.
    Row r of the data lives at slot `slot[r]` of the arrays (rows the run never reaches are not computed)."""
    kind = "topk"
    cached = True

    def __init__(self, idx: np.ndarray, lt: np.ndarray, slot: np.ndarray, path: Path, seconds: float):
        self.idx, self.lt, self.slot, self.path, self.build_seconds = idx, lt, slot, path, seconds

    def __call__(self, rows: torch.Tensor, ids: torch.Tensor) -> dict:
        r = self.slot[rows.numpy()]
        assert (r >= 0).all(), "a row outside the cached set"
        return {"idx": torch.from_numpy(np.ascontiguousarray(self.idx[r])).long(),
                "lt": torch.from_numpy(np.ascontiguousarray(self.lt[r]).astype(np.float32))}

    @staticmethod
    def paths(folder: Path, key: str, rows: torch.Tensor, k: int) -> tuple[Path, Path]:
        """The cache's two files in `folder`: named by the key (teacher, data, settings) and the rows."""
        h = hashlib.sha256(f"{key}|{rows.numpy().tobytes().hex()}".encode()).hexdigest()[:16]
        return Path(folder) / f"teacher-top{k}-{h}.idx.npy", Path(folder) / f"teacher-top{k}-{h}.logp.npy"

    @classmethod
    def existing(cls, folder: Path | None, key: str, rows: torch.Tensor, k: int,
                 also: tuple[Path, ...] = ()) -> tuple[Path, Path] | None:
        """The files of a finished cache of this key and rows in `folder`, else in the first of `also` (an
        earlier stage's work folder: the same teacher, tokens and settings give the same names) that has one."""
        for f in ((folder,) if folder is not None else ()) + tuple(also):
            pi, pl = cls.paths(f, key, rows, k)
            if pi.exists() and pl.exists():
                return pi, pl
        return None

    @classmethod
    def build(cls, teacher, train: torch.Tensor, rows: torch.Tensor, *, k: int, T: float, folder: Path, key: str,
              device: torch.device, bf16: bool, batch: int | None = None, progress: bool = True,
              compiled: bool = False, also: tuple[Path, ...] = ()) -> TopKCache:
        """Compute (or reuse) the cache of `rows` (sorted unique indices into train (n, seq_len)) under `folder`:
        token ids int32, log-probabilities float16 (their rounding is below the loss's noise: bench/heal.py).
        `batch`: rows per teacher forward (default: CACHE_BATCH_TOKENS of them); `compiled`: see teacher_topk.
        `also`: other folders (an earlier stage's work folder) whose cache of the same key is read instead of
        building one; nothing is written there."""
        import time
        t0 = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        pi, pl = cls.existing(folder, key, rows, k, also) or cls.paths(folder, key, rows, k)
        rows = rows.numpy()
        L = train.shape[1]
        batch = batch or max(1, CACHE_BATCH_TOKENS // L)
        if not (pi.exists() and pl.exists()):
            idx = np.empty((len(rows), L, k), dtype=np.int32)
            lt = np.empty((len(rows), L, k), dtype=np.float16)
            bar = tqdm(total=len(rows) * L, desc="teacher top-k cache", unit="tok", unit_scale=True,
                       disable=not progress, leave=False)
            with torch.no_grad():
                for a in range(0, len(rows), batch):
                    i, v = teacher_topk(teacher, train[torch.from_numpy(rows[a:a + batch])].to(device), k=k, T=T,
                                        device=device, bf16=bf16, compiled=compiled)
                    idx[a:a + batch], lt[a:a + batch] = i.numpy(), v.numpy()
                    bar.update(i.shape[0] * L)
            bar.close()
            for p, arr in ((pi, idx), (pl, lt)):
                tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
                with open(tmp, "wb") as f:
                    np.save(f, arr, allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, p)
            fsync_path(folder, directory=True)
        idx = np.load(pi, mmap_mode="r", allow_pickle=False)
        lt = np.load(pl, mmap_mode="r", allow_pickle=False)
        if idx.shape != (len(rows), L, k) or lt.shape != idx.shape:
            raise ValueError(f"teacher cache {pi} has shape {idx.shape}, expected {(len(rows), L, k)}")
        slot = np.full(train.shape[0], -1, dtype=np.int64)
        slot[rows] = np.arange(len(rows))
        return cls(idx, lt, slot, pi, time.perf_counter() - t0)
