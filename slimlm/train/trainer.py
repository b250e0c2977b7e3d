"""The one trainer: distil a student from a teacher on token rows, on a CPU, a GPU or several processes.

Loss: forward KL on the logits at temperature T (against the full teacher distribution computed on the fly,
or its cached top-k), optionally + CE on the text and + the residual-stream MSE at the kept layers. AdamW with
linear warmup and a cosine decay, gradient clipping and accumulation, bf16 autocast where the device has fast
bf16 matmuls (fp32 master weights), optional gradient checkpointing, and a choice of what trains (all, all but
the embeddings, norms + pruned layers, LoRA through peft). Held-out KL every N steps keeps the best state.
Several processes (torchrun): DDP, or FSDP for a model whose training state does not fit one device (dist.py).

Speed on a CPU comes from not paying for what does not learn: the tied 49k x 576 embedding/LM head is frozen by
default (no weight gradient, no AdamW state for 28M parameters); the LM head runs fused with the top-k loss a
chunk of positions at a time (losses.head_kl_topk: the logits are never whole in memory); matmuls run in bf16
where the device is fast at it; the teacher's top-k targets are computed once per token (cached when rows are
seen again); and --compile (auto for long runs) compiles the student's forward and backward. bench/heal.py
measures the result against a plain PyTorch loop in the same run.

Reproducible: the data order is a function of (seed, epoch), so a run resumed from a checkpoint (weights,
optimizer, step, best state, RNG) ends with the same weights as one that never stopped.
"""
from __future__ import annotations

import math
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ..errors import ConfigError, NumericsError
from . import checkpoint, dist
from .config import TrainConfig
from .dist import World, fast_bf16, init_world, resolve_device
from .losses import ce, head_kl_topk, hidden_mse, kl_full, kl_topk
from .parts import (
    BY_CHANGED_LAYERS,
    CompiledOrEager,
    RowOrder,
    adamw,
    add_lora,
    compile_wanted,
    decoder_layers,
    embedding_prefixes,
    load_optim_state,
    lr_at,
    merge_lora,
    optim_state,
    param_groups,
    select_parameters,
)
from .teacher import (
    OnTheFly,
    TopKCache,
    TopKOnTheFly,
    autocast,
    fused_head,
    head_input,
    heldout_keep,
    heldout_kl,
    linears_in_bf16,
    module_fingerprint,
)

# --teacher-targets auto takes the top-k cache while it stays under this size on disk (int32 id + fp16 log-prob
# per kept logit): 2 GiB is ~1.4M tokens at k=256. bench/heal.py, SmolLM2 -25%, 60k tokens: the cache's KLD
# was within 1% of full logits' (0.613 vs 0.608) at 1.28x the tokens/s counting its build (203 vs 159).
CACHE_BYTES, CACHE_BYTES_PER_LOGIT = 2 * 2**30, 6
REPLAN_STEPS, REPLAN_WINDOWS = 10, 5
# --checkpoint-every's default: a checkpoint every AUTO_CHECKPOINT_STEPS steps, but at most one per
# AUTO_CHECKPOINT_SECONDS of the run (a kill loses at most that much). SmolLM2's checkpoint (weights, best state,
# AdamW moments) is 1.3 GB, 3-7 s to write and fsync on this machine: every 100 steps on a fast machine's 30-minute
# healing that would be ~10 of them in ~1,000 s of training (an estimate, ~4%; not timed there)
AUTO_CHECKPOINT_STEPS, AUTO_CHECKPOINT_SECONDS = 100, 600.0


# ------------------------------------------------------------------------------------------ the run
def fingerprint(config: TrainConfig, data, world: World, **extra) -> dict:
    """What a checkpoint must share with the run that resumes it."""
    return {"train": config.fingerprint(), "data": data.fingerprint,
            "global_batch": config.micro_batch * config.accum * world.size, **extra}


class _Forward(torch.nn.Module):
    """The student's forward as one module, so DDP can wrap it (FSDP shards the student module inside it)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, ids: torch.Tensor, hidden: bool, head: bool = True):
        """(logits, hidden states); head=False: (the decoder's last hidden state, hidden states), for a loss that
        runs the LM head itself (losses.head_kl_topk)."""
        if not head:
            out = self.module.get_decoder()(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            return head_input(self.module, out.last_hidden_state), out.hidden_states
        out = self.module(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        return out.logits, out.hidden_states


class Trainer:
    def __init__(self, student, teacher, data, config: TrainConfig, *, folder: Path | None,
                 layer_map: list[int] | None = None, changed_layers: list[int] | None = None,
                 progress: bool = True, caches: tuple[Path, ...] = ()):
        self.cfg, self.data, self.folder, self.progress = config, data, folder, progress
        self.caches = tuple(caches)          # earlier stages' work folders whose teacher cache this run may read
        self.student, self.teacher = student, teacher
        self.device = resolve_device(config.device)
        self.world = init_world(self.device)
        self.bf16 = config.precision == "bf16" or (config.precision == "auto" and fast_bf16(self.device))
        if data.train.shape[1] != config.seq_len:
            raise ConfigError(f"training rows hold {data.train.shape[1]} tokens, the config says --seq-len "
                              f"{config.seq_len}")
        self.hidden = config.hidden_weight > 0
        if self.hidden:
            if layer_map is None:
                raise ConfigError("--hidden-weight needs the student's layer map (which teacher layer each kept)")
            if student.config.get("hidden_size") != teacher.config.get("hidden_size"):
                raise ConfigError("--hidden-weight compares residual streams: the student's hidden size differs "
                                  "from the teacher's")
        self.layer_map = layer_map
        if changed_layers is None and layer_map is not None and config.train_params in BY_CHANGED_LAYERS:
            # a caller that did not say which layers the pruning changed: compare the weights with the teacher's
            from .stages import changed_layers as which_changed
            changed_layers = [j for j, c in enumerate(which_changed(teacher, student, layer_map)) if c]
        self.changed_layers = changed_layers
        self.global_batch = config.micro_batch * config.accum * self.world.size
        self.head = self.compiled = None
        self._heldout_teacher = heldout_keep(data.heldout, teacher, 2 if self.bf16 else 4)

    # -- pieces ---------------------------------------------------------------------------------------
    @property
    def fast_kernels(self) -> bool:
        """Whether the fused head's chunk kernels run compiled (losses.CHUNK_KERNELS): where the student is."""
        return self.compiled is not None

    def _kind(self, total: int) -> str:
        """The teacher targets a run of `total` steps uses: --teacher-targets, or for "auto" top-k unless the run
        needs hidden states, or it sees rows more than once (so top-k is cached) and has no work folder or its cache
        would pass CACHE_BYTES."""
        cfg = self.cfg
        if cfg.teacher_targets != "auto":
            return cfg.teacher_targets
        if self.hidden:
            return "full"
        if self._each_row_once(total):
            return "topk"                            # top-k on the fly, nothing on disk
        if self.folder is None:
            return "full"
        rows = self.data.train.shape[0]
        return "topk" if rows * cfg.seq_len * cfg.topk * CACHE_BYTES_PER_LOGIT <= CACHE_BYTES else "full"

    def _each_row_once(self, total: int) -> bool:
        """Whether a run of `total` steps sees each training row at most once (then top-k targets are computed with
        the steps; else cached for every row)."""
        return total * self.global_batch <= self.data.train.shape[0]

    def _topk_on_the_fly(self) -> TopKOnTheFly:
        return TopKOnTheFly(self.teacher, k=self.cfg.topk, T=self.cfg.temperature, device=self.device, bf16=self.bf16,
                            compiled=self.fast_kernels)

    def _targets(self, total: int, kind: str):
        """The teacher's side: full logits on the fly, or top-k targets: on the fly while the run sees each row
        at most once (unless an earlier stage's finished cache of them is there to read: `caches`), else cached
        once for every training row."""
        cfg = self.cfg
        if kind == "full":
            return OnTheFly(self.teacher, self.device, self.bf16, hidden=self.hidden)
        once = self._each_row_once(total)
        if once and not self.caches:
            return self._topk_on_the_fly()
        rows = torch.arange(self.data.train.shape[0])
        key = f"{module_fingerprint(self.teacher.module)}|{self.data.fingerprint}|{cfg.topk}|{cfg.temperature}|" \
              f"{self.bf16}"
        if once and TopKCache.existing(None, key, rows, cfg.topk, self.caches) is None:
            return self._topk_on_the_fly()
        if self.folder is None:
            raise ConfigError("the top-k teacher cache needs a work folder")
        if self.world.main:
            cache = TopKCache.build(self.teacher, self.data.train, rows, k=cfg.topk, T=cfg.temperature,
                                    folder=self.folder, key=key, device=self.device, bf16=self.bf16,
                                    progress=self.progress, compiled=self.fast_kernels, also=self.caches)
        self.world.barrier()
        if not self.world.main:
            cache = TopKCache.build(self.teacher, self.data.train, rows, k=cfg.topk, T=cfg.temperature,
                                    folder=self.folder, key=key, device=self.device, bf16=self.bf16, progress=False,
                                    also=self.caches)
        return cache

    def _loss(self, fwd, targets, rows: torch.Tensor) -> torch.Tensor:
        # a parametrized weight (QAT's fake-quant) computed once per micro-batch: a tied embedding's reaches the
        # input side and the LM head (the graph keeps the value for the backward after the context)
        with parametrize.cached():
            return self._loss_uncached(fwd, targets, rows)

    def _loss_uncached(self, fwd, targets, rows: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        ids = self.data.train[rows].to(self.device)
        tgt = targets(rows, ids)
        if self.head is not None and "idx" in tgt and not cfg.ce_weight and not self.hidden:
            with autocast(self.device, self.bf16):
                h, _ = fwd(ids, False, head=False)
                return head_kl_topk(h, self.head(), tgt["idx"].to(self.device), tgt["lt"].to(self.device),
                                    cfg.temperature, compiled=self.fast_kernels)
        with autocast(self.device, self.bf16):
            logits, hs = fwd(ids, self.hidden)
        if "logits" in tgt:
            loss = kl_full(logits, tgt["logits"], cfg.temperature)
        else:
            loss = kl_topk(logits, tgt["idx"].to(self.device), tgt["lt"].to(self.device), cfg.temperature)
        if cfg.ce_weight:
            loss = loss + cfg.ce_weight * ce(logits, ids)
        if self.hidden:
            n = len(self.layer_map)
            loss = loss + cfg.hidden_weight * hidden_mse([hs[j + 1] for j in range(n - 1)],
                                                         [tgt["hidden"][self.layer_map[j + 1]] for j in range(n - 1)])
        return loss

    @torch.no_grad()
    def heldout_kl(self, module: torch.nn.Module) -> float:
        """KL(teacher || student) at T=1 on the held-out rows (the full teacher distribution)."""
        was = module.training
        module.eval()
        kl = heldout_kl(module, self.teacher.module, self.data.heldout, batch=self.cfg.micro_batch,
                        device=self.device, bf16=self.bf16, keep=self._heldout_teacher)
        module.train(was)
        return kl

    def _timed_step(self, fwd, targets, rows: torch.Tensor) -> float:
        """Seconds of one micro-batch's forward and backward (the first pass pays one-time costs; the second is
        timed)."""
        for _ in range(2):
            t0 = time.perf_counter()
            self._loss(fwd, targets, rows).backward()
            dt = time.perf_counter() - t0
        for p in fwd.parameters():
            p.grad = None
        return dt

    @torch.no_grad()
    def _timed_topk(self, rows: torch.Tensor) -> tuple[float, dict]:
        """Seconds the cache costs per micro-batch (the teacher's forward and top-k, as TopKCache.build runs
        them; the second pass timed), and those targets."""
        ids = self.data.train[rows].to(self.device)
        fly = self._topk_on_the_fly()
        for _ in range(2):
            t0 = time.perf_counter()
            fixed = fly(rows, ids)
            dt = time.perf_counter() - t0
        return dt, fixed

    def _plan(self, fwd, order: RowOrder, deadline: float | None) -> tuple[int, str]:
        """Steps of the run and its teacher targets: from the token budget, or from the time left and a timed
        micro-batch: on top-k targets plus their cost (top-k or auto), else (full, or auto where the top-k run would
        need a cache it cannot have) with the full teacher distribution on the fly."""
        kind, v = self.cfg.budget_kind, self.cfg.budget_value
        per_step = self.global_batch * self.cfg.seq_len
        if kind == "tokens":
            total = max(1, math.ceil(v / per_step))
            return total, self._kind(total)
        if deadline is None:
            deadline = time.monotonic() + v
        rows = order.rows(0, self.global_batch)[:self.cfg.micro_batch]
        cfg, kind = self.cfg, None

        def fit(step_s: float) -> int:                # the steps left at step_s each, the same on every process
            return int(self.world.mean(float(int((deadline - time.monotonic()) / step_s)), self.device))

        # top-k first: when it is taken, the full-logit step is never timed (its first pass would also compile a
        # second graph of the student under --compile)
        if cfg.teacher_targets == "topk" or self._kind(1) == "topk":
            cache_s, fixed = self._timed_topk(rows)
            step_s = (self._timed_step(fwd, lambda r, ids: fixed, rows) + cache_s) * cfg.accum * 1.05
            steps = fit(step_s)
            if cfg.teacher_targets == "topk" or self._kind(steps) == "topk":
                kind = "topk"
        if kind is None:
            step_s = self._timed_step(fwd, OnTheFly(self.teacher, self.device, self.bf16, hidden=self.hidden),
                                      rows) * cfg.accum * 1.05
            steps, kind = fit(step_s), "full"
        if steps < 1:
            raise ConfigError(f"--heal {self.cfg.budget}: no time is left for training after the preparation "
                              f"(one step takes {step_s:.1f} s); give a longer budget")
        return steps, kind

    # -- the loop -------------------------------------------------------------------------------------
    def run(self, *, fingerprint: dict, resume: dict | None = None, deadline: float | None = None) -> dict:
        cfg, world, dev = self.cfg, self.world, self.device
        t_start = time.perf_counter()
        torch.manual_seed(cfg.seed)
        fsdp = world.size > 1 and cfg.parallel == "fsdp"
        # FSDP takes apart a training copy over the student's weights; the student stays whole on the CPU
        module = dist.training_copy(self.student.module.to("cpu")) if fsdp else self.student.module.to(dev)
        self.teacher.module.to(dev)
        lora = cfg.train_params == "lora"
        if lora:
            for p in module.parameters():
                p.requires_grad_(False)
            module = add_lora(module, cfg.lora_rank)
            names = [n for n, p in module.named_parameters() if p.requires_grad]
        else:
            names = select_parameters(module, cfg.train_params, self.changed_layers)
        if cfg.grad_checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if fsdp:
            dist.fully_shard_model(module, decoder_layers(module), dev)
        module.train()
        params = dict(module.named_parameters())         # with FSDP: this process's shards (DTensors)
        trainable = [params[n] for n in names]
        opt = adamw(param_groups(params, names, cfg, embedding_prefixes(module)), lr=cfg.lr, betas=cfg.betas,
                    weight_decay=cfg.weight_decay, fused=not fsdp)
        # the LM head fused with the top-k loss (no (positions, vocab) logits); FSDP shards W inside the module
        # (a callable: under QAT of the embeddings the weight is a parametrization's output, new every step)
        self.head = None if fsdp or fused_head(module) is None else partial(getattr, module.get_output_embeddings(),
                                                                            "weight")
        fwd = _Forward(module)
        if world.size > 1 and not fsdp:
            fwd = torch.nn.parallel.DistributedDataParallel(fwd, device_ids=[dev.index] if dev.type == "cuda" else None)
        if compile_wanted(cfg, dev, fsdp=fsdp, lora=lora):
            # QAT's fake-quant parametrizations round the block scales to fp16 in the forward: compiled, the
            # roundings stay (what trains is what the file holds)
            exact = any(parametrize.is_parametrized(m) for m in module.modules())
            fwd = self.compiled = CompiledOrEager(fwd, exact_casts=exact)
        order = RowOrder(self.data.train.shape[0], cfg.seed)
        state = {"step": 0, "tokens": 0, "curve": [], "evals": [], "best": None, "total_steps": None,
                 "teacher_targets": None, "train_seconds": 0.0}
        best = None
        if resume is not None:                           # a checkpoint holds whole tensors, in either mode
            if fsdp:
                dist.load_full_state(module, resume["params"])
                load_optim_state(opt, resume["optim"], partial(dist.load_full_optim, opt))
            else:
                module.load_state_dict(resume["params"], strict=True)
                load_optim_state(opt, resume["optim"])
            state = resume["meta"]["state"]
            best = {n: dist.shard_like(t, params[n]) for n, t in resume["best"].items()}
            torch.set_rng_state(resume["rng"]["cpu"])
        if deadline is None and cfg.budget_kind == "seconds":
            deadline = time.monotonic() + cfg.budget_value
        if state["total_steps"] is None:
            state["total_steps"], state["teacher_targets"] = self._plan(fwd, order, deadline)
        kind = state.get("teacher_targets") or self._kind(state["total_steps"])
        targets = self._targets(state["total_steps"], kind)
        t_eval = 0.0
        if not state["evals"]:
            t0 = time.perf_counter()
            kl = self.heldout_kl(module)
            t_eval = time.perf_counter() - t0
            state["evals"].append([0, kl])
            state["best"] = [0, kl]
            best = {n: params[n].detach().clone() for n in names}
        total = state["total_steps"]
        # a duration budget: every REPLAN_STEPS real steps (optimizer and all) the plan becomes the steps that fit
        # before the deadline (the timed micro-batch of _plan leaves out the optimizer, the held-out evaluations
        # and the machine's load, which changes), so the cosine schedule ends on time instead of being cut. The
        # rate is the median of the last REPLAN_WINDOWS windows' and the plan may shrink or grow: a passing slow
        # window (another process on the cores, a compile) once cut a 25-minute run to 14 minutes for good
        def fits(step: int, per: float) -> int:
            """The steps that end before the deadline at `per` seconds a step, the held-out evaluations they pass
            and the one after the last step left out (a 30-minute SmolLM2 run once ended 2.4 s late on its final
            evaluations); the same number on every process."""
            left = deadline - time.monotonic()
            evals = (int(left / per) // cfg.eval_every if cfg.eval_every else 0) + 1
            return max(step + 1, int(world.mean(float(step + int((left - evals * t_eval) / per)), dev)))

        replan = state["step"] + REPLAN_STEPS if deadline is not None and cfg.budget_kind == "seconds" else None
        t_window, windows, last_step_s = time.perf_counter(), [], 0.0
        bar = tqdm(total=total, initial=state["step"], desc="distillation", unit="step",
                   disable=not (self.progress and world.main), leave=False)
        stopped = "budget"
        t_loop = time.perf_counter()
        t_checkpoint = time.monotonic()
        tokens_at_loop = state["tokens"]
        while state["step"] < total:
            step = state["step"]
            if deadline is not None and time.monotonic() > deadline:
                stopped = "deadline"
                break
            if step == replan:
                windows.append((time.perf_counter() - t_window) / REPLAN_STEPS)
                per = statistics.median(windows[-REPLAN_WINDOWS:]) * 1.02
                fit = fits(step, per)
                replan, t_window = step + REPLAN_STEPS, time.perf_counter()
            elif windows:
                # between replans a slow-down shrinks the plan at once (the machine's load changed: in the run's last
                # seconds the deadline would cut the schedule before its learning rate reaches zero; the full test
                # suite's other worker once did that to a 15-second run); only the median's replan grows it back.
                # In the last window's worth of time no replan comes: the plan follows the machine as it is now
                # (the window's rate so far and the last step's), shrinking or growing; a median pulled up by a
                # passing slow window once ended a 15-second run at 27 steps of the 36 that fitted
                done = step - (replan - REPLAN_STEPS)
                now_rate = (time.perf_counter() - t_window) / done * 1.02 if done >= 2 else 0.0
                rate = max(per, now_rate)
                if deadline - time.monotonic() < REPLAN_STEPS * rate:
                    fit = fits(step, max(now_rate, last_step_s * 1.02))
                else:
                    fit = min(total, fits(step, rate))
            else:
                fit = total
            if fit != total:
                total = state["total_steps"] = fit
                bar.total = total
                bar.refresh()
            t_step = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg) * g.get("lr_mult", 1.0)
            rows = order.rows(step, self.global_batch)
            local = rows[world.rank * cfg.micro_batch * cfg.accum:(world.rank + 1) * cfg.micro_batch * cfg.accum]
            lsum = 0.0
            for a in range(cfg.accum):
                mb = local[a * cfg.micro_batch:(a + 1) * cfg.micro_batch]
                # DDP all-reduces once per step; FSDP reduce-scatters every micro-batch into the gradient shards
                # (skipping it would keep whole gradients between micro-batches: the memory FSDP is there to save)
                sync = a == cfg.accum - 1 or world.size == 1 or fsdp
                ctx = fwd.no_sync() if not sync else _nullcontext()
                with ctx:
                    loss = self._loss(fwd, targets, mb) / cfg.accum
                    loss.backward()
                lsum += float(loss.detach())
            loss_v = world.mean(lsum, dev)
            gnorm = dist.full(torch.nn.utils.clip_grad_norm_(trainable, cfg.clip if cfg.clip > 0 else float("inf")))
            if not (math.isfinite(loss_v) and world.all_true(bool(torch.isfinite(gnorm)), dev)):
                kept = f"; the last good checkpoint {self.folder / checkpoint.NAME} is kept" if (
                    self.folder is not None and (self.folder / checkpoint.NAME).exists()) else ""
                raise NumericsError(f"training loss {loss_v} / gradient norm {float(gnorm)} at step {step + 1} is "
                                    f"not finite: stopped, nothing written{kept}; try a lower --lr")
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["step"] = step + 1
            last_step_s = time.perf_counter() - t_step
            state["tokens"] += self.global_batch * cfg.seq_len
            # [step, tokens, loss, lr, training seconds so far] (a bench's steady rate leaves out the first steps)
            state["curve"].append([step + 1, state["tokens"], loss_v, opt.param_groups[0]["lr"],
                                   state["train_seconds"] + time.perf_counter() - t_loop])
            bar.update(1)
            rate = (state["tokens"] - tokens_at_loop) / max(1e-9, time.perf_counter() - t_loop)
            bar.set_postfix(loss=f"{loss_v:.4f}", tok_s=f"{rate:.0f}")
            last = state["step"] == total
            t_aside = time.perf_counter()            # evaluations and checkpoints: left out of the step rate
            if (cfg.eval_every and state["step"] % cfg.eval_every == 0) or last:
                kl = self.heldout_kl(module)
                t_eval = time.perf_counter() - t_aside
                state["eval_seconds"] = state.get("eval_seconds", 0.0) + t_eval
                state["evals"].append([state["step"], kl])
                if kl < state["best"][1]:
                    state["best"] = [state["step"], kl]
                    best = {n: params[n].detach().clone() for n in names}
            if self.folder is not None and not last and self._checkpoint_due(state["step"], t_checkpoint):
                t_checkpoint = time.monotonic()
                blob = {"params": module.state_dict(), "best": best, "optim": optim_state(opt)}
                if fsdp:       # every process takes part in gathering the shards; rank 0 keeps and writes them
                    blob = dist.gather_full(blob, keep=world.main)
                if world.main:
                    checkpoint.save(self.folder, fingerprint=fingerprint, state=state, **blob)
                world.barrier()
                state["checkpoint_seconds"] = state.get("checkpoint_seconds", 0.0) + time.monotonic() - t_checkpoint
                state["checkpoints"] = state.get("checkpoints", 0) + 1
            t_window += time.perf_counter() - t_aside
        bar.close()
        state["train_seconds"] += time.perf_counter() - t_loop
        if state["evals"][-1][0] != state["step"]:          # stopped by the deadline between evaluations
            kl = self.heldout_kl(module)
            state["evals"].append([state["step"], kl])
            if kl < state["best"][1]:
                state["best"] = [state["step"], kl]
        return self._finish(module, lora, fsdp, state, best, stopped, t_start, targets, params, names)

    def _checkpoint_due(self, step: int, since: float) -> bool:
        """Whether a checkpoint is written after `step`: every --checkpoint-every steps, or by default every
        AUTO_CHECKPOINT_STEPS steps once AUTO_CHECKPOINT_SECONDS have passed since the last one (or the start);
        the same answer on every process."""
        every = self.cfg.checkpoint_every
        if every is not None:
            return every > 0 and step % every == 0
        if step % AUTO_CHECKPOINT_STEPS:
            return False
        return self.world.all_true(time.monotonic() - since >= AUTO_CHECKPOINT_SECONDS, self.device)

    def _finish(self, module, lora, fsdp, state, best, stopped, t_start, targets, params, names) -> dict:
        best_step, best_kl = state["best"]
        final_step = state["step"]
        if best_step != final_step:     # an earlier held-out evaluation (or the start) beat the final state
            with torch.no_grad():
                for n in names:
                    params[n].copy_(best[n])
        n_trainable = sum(params[n].numel() for n in names)
        module.eval()
        if fsdp:                                 # the whole weights go back into the student on every process
            dist.unshard_into(module, self.student.module)
            self.student.module.eval()
            for p in self.student.module.parameters():
                p.requires_grad_(False)
        else:
            if self.cfg.grad_checkpointing:
                module.gradient_checkpointing_disable()
            for p in module.parameters():
                p.requires_grad_(False)
            self.student.module = merge_lora(module, lora).to("cpu")
        self.teacher.module.to("cpu")
        tr = state["train_seconds"]
        return {"steps": final_step, "total_steps": state["total_steps"], "tokens": state["tokens"],
                "seconds": time.perf_counter() - t_start, "train_seconds": tr,
                "tokens_per_s": state["tokens"] / tr if tr else None, "curve": state["curve"],
                # of train_seconds: the held-out evaluations and the checkpoints (written after the state they hold)
                "eval_seconds": state.get("eval_seconds", 0.0), "checkpoint_seconds": state.get("checkpoint_seconds", 0.0),
                "checkpoints": state.get("checkpoints", 0),
                "evals": state["evals"], "initial_heldout_kl": state["evals"][0][1], "best_step": best_step,
                "best_heldout_kl": best_kl, "stopped": stopped, "precision": "bf16" if self.bf16 else "fp32",
                "device": str(self.device), "world_size": self.world.size,
                "parallel": ("fsdp" if fsdp else "ddp") if self.world.size > 1 else None,
                "trainable_params": n_trainable, "compiled": bool(self.compiled and self.compiled.ok),
                "teacher_targets": {"kind": targets.kind, "k": self.cfg.topk if targets.kind == "topk" else None,
                                    "cached": getattr(targets, "cached", False),
                                    "build_seconds": getattr(targets, "build_seconds", 0.0),
                                    "path": str(getattr(targets, "path", "") or "") or None}}


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def train(student, teacher, data, config: TrainConfig, *, folder: Path | None = None, resume: bool = False,
          layer_map: list[int] | None = None, changed_layers: list[int] | None = None,
          deadline: float | None = None, progress: bool = True, extra: dict | None = None,
          caches: tuple[Path, ...] = ()) -> dict:
    """Distil `student` (a slimlm Model, trained in place) from `teacher` on `data` (train.data.TrainData).
    `folder`: checkpoints and the teacher cache; `resume`: continue from its checkpoint (refused when any
    setting, the data, the global batch or `extra` — what the caller adds to the fingerprint — differs).
    `caches`: earlier stages' work folders whose teacher top-k cache (same teacher, data and settings) is read
    instead of built again. Returns the run's record."""
    t = Trainer(student, teacher, data, config, folder=folder, layer_map=layer_map, changed_layers=changed_layers,
                progress=progress, caches=caches)
    fp = fingerprint(config, data, t.world, **(extra or {}))
    blob = checkpoint.load(folder, fp) if resume else None
    with linears_in_bf16(teacher.module, t.bf16):
        return t.run(fingerprint=fp, resume=blob, deadline=deadline)
