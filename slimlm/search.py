"""`slimlm search`: the best file for a size, speed or quality target, found by measuring real GGUF files.

A trial is one `slimlm compress` recipe: structured pruning ratio and the share of it taken as whole layers,
healing or not, the PTQ method, and (without --target-size) a bits-per-weight budget that the per-tensor type
allocation fills. Every trial writes its GGUF and evaluates it in llama.cpp against the original on the same
tokens; nothing is predicted in the final table. The targets:

- `--target-size S`: every trial is made at size S (compress --target-size); minimise KL divergence.
- `--max-kld K`: minimise the file size among files with KL divergence <= K.
- `--min-speedup X`: minimise KL divergence among files whose llama.cpp generation speed is >= X times that of
  llama.cpp's own `--speed-of` preset of the original (default Q8_0), measured in the same run.

Optuna runs the search (TPE, multivariate, with the target as a constraint) and its storage is the trial
journal (`sqlite:///OUT_DIR/study.db` unless --storage names another database): a killed search resumes with
the same command; the trial the kill interrupted is rerun with the same parameters and nothing that finished is
redone. Each trial's sampler is seeded from --seed and the number of trials before it, so a resumed search
proposes what the uninterrupted one would have (one worker; a target that involves speed is measured, so it
varies a little run to run). Several workers (`--workers N` here, or other machines on one database URL) share
one study; a proposal that repeats a finished trial is not rerun (its measurement is reused, marked as such).

OUT_DIR ends with `best.gguf` (+ its report), `recipes.json` (every Pareto-optimal file in size, KL divergence
and speed, with the one command that rebuilds it), `search.json` (every trial), `report.md`, `report.html` and
the plots; llama.cpp's own presets of the original (with the importance matrix of the same calibration text)
are made and measured once and drawn on the same axes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError, SlimlmError

STUDY = "slimlm-search"
DEFAULT_BASELINES = ("Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
SEARCH_METHODS = ("rtn", "gptq", "awq", "awq+gptq", "gptq+qat")
QAT_METHODS = ("gptq+qat",)         # trained on the file's grids for --qat (compress --method gptq+qat)
LAYER_SHARES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
BPW_STEP = 0.25
MAX_BPW = 8.5                       # Q8_0
PROXY_CHUNKS = 2                    # calibration chunks the pruned model's KL divergence (the cheap proxy) uses
RULE_OUT = 1.5                      # a candidate whose proxy is this x the best file's KLD (or --max-kld) stops
FIRST_BPW = 4.5                     # the first trial: about Q4_0's bits per weight
STARTUP_TRIALS = 5                  # random proposals before TPE models the results


@dataclass(frozen=True)
class SearchConfig:
    target_size: str | None = None      # file size budget ("64MiB"): minimise KLD at this size
    min_speedup: float | None = None    # generation speed >= this x llama.cpp's --speed-of preset: minimise KLD
    max_kld: float | None = None        # KLD <= this: minimise the file size
    budget: str | None = None           # wall time ("2h"); no trial starts that would end after it
    trials: int | None = None           # or at most this many trials in the study (resumed runs included)
    heal: str | None = None             # healing a pruned trial may get (a duration or token count); none: no healing
    data: tuple[str, ...] = ()          # healing and QAT text (default: the calibration text, as compress --heal)
    methods: tuple[str, ...] = ("gptq",)
    qat: str | None = None              # QAT budget of a gptq+qat candidate (a duration or token count)
    max_prune: float = 0.5
    prune_step: float = 0.05
    prune_method: str = "mlp+layers"
    speed_of: str = "Q8_0"
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    calib: str = "default"
    calib_chunks: int = 32
    text: str | None = None
    n_ctx: int = 512
    max_chunks: int | None = 16
    speed: bool = True                  # measure each file's llama.cpp speed (needed by --min-speedup)
    seed: int = 0
    storage: str | None = None
    study: str = STUDY
    workers: int = 1

    def __post_init__(self):
        from .calib import check_text_file
        from .mixed import parse_size
        from .source import check_ctx_value
        from .train.config import parse_budget
        given = [n for n, v in (("--target-size", self.target_size), ("--min-speedup", self.min_speedup),
                                ("--max-kld", self.max_kld)) if v is not None]
        if len(given) != 1:
            raise ConfigError("give exactly one target: --target-size SIZE, --min-speedup X or --max-kld K"
                              + (f" (got {', '.join(given)})" if given else ""))
        if self.target_size is not None:
            parse_size(self.target_size)
        if self.min_speedup is not None and not (math.isfinite(self.min_speedup) and self.min_speedup > 0):
            raise ConfigError(f"--min-speedup must be a positive number, got {self.min_speedup}")
        if self.max_kld is not None and not (math.isfinite(self.max_kld) and self.max_kld > 0):
            raise ConfigError(f"--max-kld must be a positive number, got {self.max_kld}")
        if self.budget is not None and parse_budget(self.budget, "--budget")[0] != "seconds":
            raise ConfigError(f"--budget {self.budget!r}: give a duration (90s, 30m, 2h)")
        if self.trials is not None and self.trials < 1:
            raise ConfigError(f"--trials must be >= 1, got {self.trials}")
        if self.heal is not None:
            parse_budget(self.heal)
        for f in self.data:
            check_text_file(f, "--data")
        bad = [m for m in self.methods if m not in SEARCH_METHODS]
        if bad or not self.methods:
            raise ConfigError(f"--methods {','.join(self.methods)}: choose from {', '.join(SEARCH_METHODS)}")
        if any(m in QAT_METHODS for m in self.methods):
            if self.qat is None:
                raise ConfigError(f"--methods {','.join(self.methods)}: quantization-aware training needs its "
                                  f"budget per candidate: give --qat BUDGET (a duration such as 10m, or a token count)")
            parse_budget(self.qat, "--qat")
        elif self.qat is not None:
            raise ConfigError(f"--qat {self.qat} is the training budget of --methods gptq+qat candidates: add "
                              f"gptq+qat to --methods (or drop --qat)")
        if not 0 <= self.max_prune <= 0.9:
            raise ConfigError(f"--max-prune must be between 0 and 0.9, got {self.max_prune}")
        if not 0 < self.prune_step <= 0.5:
            raise ConfigError(f"--prune-step must be in (0, 0.5], got {self.prune_step}")
        if self.prune_method not in ("mlp+layers", "mlp", "width", "layers"):
            raise ConfigError(f"--prune-method {self.prune_method!r}: mlp+layers, mlp, width or layers")
        from .baseline import check_compare_type
        for b in self.baselines:
            check_compare_type(b)
        if self.min_speedup is not None:
            check_compare_type(self.speed_of)
            if not self.speed:
                raise ConfigError("--min-speedup needs speed measurements: drop --no-speed")
        check_text_file(self.text, "--text")
        check_text_file(None if self.calib == "default" else self.calib, "--calib")
        check_ctx_value(self.n_ctx)
        if self.calib_chunks < 1:
            raise ConfigError(f"--calib-chunks must be >= 1, got {self.calib_chunks}")
        if self.max_chunks is not None and self.max_chunks < 1:
            raise ConfigError(f"--chunks must be >= 0 (0 = all), got {self.max_chunks}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.storage is not None:
            check_storage_url(self.storage)

    @property
    def mode(self) -> str:
        return ("target_size" if self.target_size is not None else
                "max_kld" if self.max_kld is not None else "min_speedup")

    @property
    def budget_seconds(self) -> float | None:
        from .train.config import parse_budget
        return None if self.budget is None else parse_budget(self.budget, "--budget")[1]

    def fingerprint(self, model) -> dict:
        """What defines the study: a resumed search with other values is refused, not mixed in. The budget,
        the trial count, the storage and the workers may change between runs."""
        d = asdict(self)
        for k in ("budget", "trials", "storage", "workers", "study"):
            d.pop(k)
        if d["qat"] is None:            # studies made before --qat existed resume
            d.pop("qat")
        d["model"] = str(Path(model).resolve()) if model else None
        return json.loads(json.dumps(d))


# ---- the space -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Space:
    prune_steps: tuple[int, int]            # prune ratio = k * prune_step, k in [lo, hi]
    bpw_quarters: tuple[int, int] | None    # bits per weight = q * 0.25 (no --target-size)
    first: int = 0                          # the first trial's k
    ffn_multiple: int | None = None         # MLP widths kept a multiple of this (K-quant rows for ffn_down)


def make_space(cfg: SearchConfig, info) -> Space:
    """The ranges the target allows, from the model's shapes: at --target-size, the least pruning that can
    reach the size (llama.cpp's smallest types on what stays); without it, the bits per weight from the
    smallest the shapes can reach to Q8_0's."""
    from .mixed import parse_size, smallest_bytes
    from .prune.command import k_quant_ffn_multiple
    small = smallest_bytes(info.shapes)
    n_params = max(int(info.n_params), 1)
    ffn = {s[1] for n, s in info.shapes.items() if n.endswith("ffn_down.weight") and len(s) == 2}
    mult = k_quant_ffn_multiple(ffn)        # pruned MLP widths in K-quant rows when the model's are
    hi = int(math.floor(cfg.max_prune / cfg.prune_step + 1e-9))
    lo = 0
    if cfg.target_size is not None:
        target = parse_size(cfg.target_size)
        need = sum(small.values()) - target
        if need > 0:
            lin = {n: b for n, b in small.items() if len(info.shapes[n]) == 2 and n.startswith("blk.")}
            lin_params = sum(math.prod(info.shapes[n]) for n in lin)
            bits = 8 * sum(lin.values()) / max(lin_params, 1)        # the smallest types' bits on what pruning removes
            least = need / (n_params * bits / 8)
            lo = int(math.ceil(least / cfg.prune_step - 1e-9))
            if lo > hi:
                raise ConfigError(f"--target-size {cfg.target_size}: even at llama.cpp's smallest types this model needs "
                                  f"about {least:.0%} of its parameters pruned to fit, more than --max-prune "
                                  f"{cfg.max_prune:g}; raise --max-prune or the target")
        at_q4 = 1 - target * 8 / FIRST_BPW / n_params        # the pruning at which the rest gets ~4.5 bits each
        first = min(max(lo, int(math.ceil(at_q4 / cfg.prune_step - 1e-9))), hi)
        return Space((lo, hi), None, first, mult)
    least_bpw = 8 * sum(small.values()) / n_params
    q_lo = int(math.ceil(least_bpw / BPW_STEP + 1e-9))
    return Space((lo, hi), (q_lo, int(MAX_BPW / BPW_STEP)), 0, mult)


def suggest(trial, cfg: SearchConfig, space: Space) -> dict:
    """One candidate (define-by-run: layer share and healing only when something is pruned)."""
    lo, hi = space.prune_steps
    k = trial.suggest_int("prune_steps", lo, hi) if hi > lo else lo
    p = {"prune": round(k * cfg.prune_step, 6)}
    if k > 0:
        if cfg.prune_method == "mlp+layers":
            p["layer_share"] = trial.suggest_categorical("layer_share", LAYER_SHARES)
        if cfg.heal is not None:
            p["heal"] = trial.suggest_categorical("heal", ("none", cfg.heal))
    p["method"] = trial.suggest_categorical("method", cfg.methods) if len(cfg.methods) > 1 else cfg.methods[0]
    _qat_params(cfg, p)
    if space.bpw_quarters is not None:
        p["bpw"] = trial.suggest_int("bpw_quarters", *space.bpw_quarters) * BPW_STEP
    return p


def _qat_params(cfg: SearchConfig, p: dict) -> None:
    """A QAT candidate's budget; after pruning it is healed first (compress heals a pruned model before QAT, and
    QAT's learned rounding and scales cannot undo what pruning removed): for --heal (whatever was sampled for it),
    or for --qat when the search has no --heal."""
    if p["method"] in QAT_METHODS:
        p["qat"] = cfg.qat
        if p["prune"] > 0 and p.get("heal", "none") == "none":
            p["heal"] = cfg.heal or cfg.qat


def first_candidate(cfg: SearchConfig, space: Space) -> dict:
    """The study's first trial, before any sampling: compress's defaults (layer share, the most healing allowed,
    the first method) at about FIRST_BPW bits per weight: at --target-size, the least pruning (in the range the
    target allows) at which the target gives the remaining weights that many bits; otherwise no pruning."""
    from .prune.command import LAYER_SHARE
    k = space.first
    p = {"prune_steps": k}
    if k > 0 and cfg.prune_method == "mlp+layers":
        p["layer_share"] = min(LAYER_SHARES, key=lambda s: abs(s - LAYER_SHARE))
    if k > 0 and cfg.heal is not None:
        p["heal"] = cfg.heal
    if len(cfg.methods) > 1:
        p["method"] = cfg.methods[0]
    if space.bpw_quarters is not None:
        p["bpw_quarters"] = min(max(int(FIRST_BPW / BPW_STEP), space.bpw_quarters[0]), space.bpw_quarters[1])
    return p


def trial_argv(cfg: SearchConfig, model, p: dict, out: Path, ffn_multiple: int | None = None) -> list[str]:
    """The `slimlm compress` arguments of a candidate: what the trial runs and what the recipe prints."""
    argv = ["compress"] + ([str(model)] if model else []) + ["-o", str(out), "--method", p["method"],
                                                            "--calib"] + ([] if cfg.calib == "default" else [cfg.calib])
    argv += ["--calib-chunks", str(cfg.calib_chunks), "--ctx", str(cfg.n_ctx), "--chunks", str(cfg.max_chunks or 0)]
    if cfg.text:
        argv += ["--text", cfg.text]
    argv += ["--target-size", cfg.target_size] if cfg.target_size is not None else ["--bpw", f"{p['bpw']:g}"]
    data = ["--data", *cfg.data] if cfg.data else []
    if p["prune"] > 0:
        argv += ["--prune", f"{p['prune']:g}", "--prune-method", cfg.prune_method]
        if cfg.prune_method in ("mlp", "mlp+layers") and ffn_multiple:
            argv += ["--prune-ffn-multiple", str(ffn_multiple)]
        if "layer_share" in p:
            argv += ["--prune-layer-share", f"{p['layer_share']:g}"]
        if p.get("heal", "none") != "none":
            argv += ["--heal", p["heal"], "--no-unhealed"] + data
    if p["method"] in QAT_METHODS:          # after --prune: --heal heals, then QAT trains; without: --heal is QAT's
        argv += ["--qat-budget", p["qat"]] if p["prune"] > 0 else ["--heal", p["qat"]] + data
    if not cfg.speed:
        argv.append("--no-speed")
    return argv


# ---- objectives ------------------------------------------------------------------------------------------------
def measured_values(cfg: SearchConfig, m: dict, base_tps: float | None) -> tuple[float, list[float]]:
    """(the objective, the constraints: <= 0 is feasible) of a measured trial."""
    from .mixed import parse_size
    if cfg.mode == "target_size":
        return m["kld"], [float(m["file_bytes"] - parse_size(cfg.target_size))]
    if cfg.mode == "max_kld":
        return m["file_bytes"] / 2**20, [m["kld"] - cfg.max_kld]
    speedup = (m.get("gen_tps") or 0.0) / base_tps if base_tps else 0.0
    return m["kld"], [cfg.min_speedup - speedup]


def _sampler(cfg: SearchConfig, key: int):
    """TPE seeded from --seed and the trial's place in the study: the same history gives the same proposal."""
    import optuna
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=(cfg.seed * 1_000_003 + key) % 2**32, multivariate=True, group=True,
                                          n_startup_trials=STARTUP_TRIALS)


# ---- storage ---------------------------------------------------------------------------------------------------
def storage_url(cfg: SearchConfig, out_dir: Path) -> str:
    return cfg.storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"


def open_storage(url: str):
    import optuna
    check_storage_url(url)
    kw = {"connect_args": {"timeout": 120}} if url.startswith("sqlite:") else {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kw)
        except Exception as e:                   # sqlalchemy/optuna: a bad URL, a missing driver, no server, or
            # another process creating the schema at this moment (a row or a table it made first): retry that one
            racing = "IntegrityError" in type(e).__name__ or "already exists" in str(e)
            if attempt == 4 or not racing:
                raise ConfigError(f"--storage {url}: cannot open the study database "
                                  f"({type(e).__name__}: {e})") from None
            time.sleep(1.0 + attempt)


@contextlib.contextmanager
def ask_lock(url: str):
    """Serializes the workers' `study.ask()` on an SQLite study. Optuna pops a queued trial with SELECT ... FOR
    UPDATE, which SQLite ignores: two workers asking at once both got the same queued trial (6 of 10 tries
    here), ran it into one file and failed. The lock is an flock on the database file itself (independent of
    SQLite's own fcntl locks, released when a killed worker's process ends); other databases lock the row."""
    path = None
    if url.startswith("sqlite:"):
        from sqlalchemy.engine import make_url
        db = make_url(url).database
        path = db if db and db != ":memory:" and os.path.exists(db) else None
    try:
        import fcntl
    except ImportError:                           # no flock (Windows): a single worker is safe
        fcntl = None
    if path is None or fcntl is None:
        yield
        return
    with open(path, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_storage_url(url: str) -> None:
    if not any(url.startswith(s) for s in ("sqlite:", "postgresql", "mysql", "oracle", "mssql")):
        raise ConfigError(f"--storage {url!r}: give a database URL (sqlite:///path/study.db, "
                          f"postgresql://user@host/db, mysql://...)")


def open_study(cfg: SearchConfig, model, url: str, *, create: bool):
    """The study (created with the config's fingerprint, or checked against it when it exists)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url)
    fp = cfg.fingerprint(model)
    study = optuna.create_study(storage=storage, study_name=cfg.study, load_if_exists=True,
                                direction="minimize", sampler=_sampler(cfg, 0))
    have = study.user_attrs.get("slimlm_search")
    if have is None and create:
        study.set_user_attr("slimlm_search", fp)
    elif have is not None and have != fp:
        diff = sorted(k for k in set(have) | set(fp) if have.get(k) != fp.get(k))
        raise ConfigError(f"the study {cfg.study!r} in {url} was made with other settings ({', '.join(diff)}); "
                          f"give the same settings to resume it, or another -o / --study for a new search")
    return study


def _counted(trials) -> list:
    """The trials that make up the study's sequence: all but those a kill interrupted (rerun as new trials)."""
    return [t for t in trials if not t.user_attrs.get("stale")]


def requeue_stale(study, out_dir: Path, say) -> int:
    """Trials left RUNNING by a killed process of this machine: marked failed and stale, their files removed,
    and their parameters queued to run first. Returns how many."""
    from optuna.trial import TrialState
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host", host) != host or _alive(t.user_attrs.get("pid")):
            continue
        study._storage.set_trial_user_attr(t._trial_id, "stale", True)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        for f in (out_dir / "trials").glob(f"t{t.number:04d}*"):
            shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        say(f"trial {t.number} was interrupted by a kill: it runs again with the same parameters")
        n += 1
    return n


# ---- trials ----------------------------------------------------------------------------------------------------
class RuledOut(Exception):
    """A candidate stopped by its cheap proxy before the expensive steps."""


def run_trial(cfg: SearchConfig, model, params: dict, out: Path, *, rule_out: float | None = None,
              proxies: dict | None = None, ffn_multiple: int | None = None) -> dict:
    """Run one candidate through compress (in this process) and return its measurements. `proxies` is filled
    with the cheap predictions as they come: `pruned_kld`, the pruned model's KL divergence to the original in
    torch on PROXY_CHUNKS calibration chunks (0 when nothing is pruned); once the size budget's types are chosen,
    `model_kld` (the healed model's, when healed; else pruned_kld), `fisher_kld` (the budget's Fisher prediction
    of the quantization's KL divergence) and `predicted` (their sum). With `rule_out`: an unhealed candidate whose
    pruned_kld exceeds it stops before healing or quantization, and any candidate whose `predicted` exceeds it
    stops before GPTQ and the evaluation (RuledOut)."""
    import gc

    from .cli import build_parser, compress_config
    from .compress import compress
    from .lazy import trim_heap
    proxies = {} if proxies is None else proxies
    proxies["pruned_kld"] = 0.0

    healed = params.get("heal", "none") != "none"
    qat = params["method"] in QAT_METHODS       # the Fisher prediction is rounding's: QAT trains that error away

    def inspect(stage, *, original, model, chunks, predicted_kld=None):
        from .train.heal import heldout_kl
        if stage == "pruned":
            proxies["pruned_kld"] = heldout_kl(model, original, chunks[-PROXY_CHUNKS:])
            if rule_out is not None and not healed and proxies["pruned_kld"] > rule_out:
                raise RuledOut(f"the pruned model alone has KL divergence {proxies['pruned_kld']:.4f} on "
                               f"calibration text, above {rule_out:.4f}")
        elif stage == "budget":
            proxies["model_kld"] = (heldout_kl(model, original, chunks[-PROXY_CHUNKS:]) if healed
                                    else proxies["pruned_kld"])
            proxies["fisher_kld"] = predicted_kld
            proxies["predicted"] = proxies["model_kld"] + predicted_kld
            if rule_out is not None and proxies["predicted"] > rule_out and not qat:
                raise RuledOut(f"predicted KL divergence {proxies['predicted']:.4f} (the "
                               f"{'healed' if healed else 'pruned'} model's {proxies['model_kld']:.4f} on "
                               f"calibration text + the budget's Fisher prediction {predicted_kld:.4f}), above "
                               f"{rule_out:.4f}")
    argv = trial_argv(cfg, model, params, out, ffn_multiple)
    a = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        rep = compress(a.model, a.output, compress_config(a), overwrite=True, progress=False,
                       command="slimlm " + shlex.join(argv), inspect=inspect)
        h = rep.headline()
    finally:
        gc.collect()
        trim_heap()
    m = {k: h[k] for k in ("file_bytes", "bits_per_weight", "n_params", "kld", "ppl_after", "ppl_before",
                           "top1_agreement", "gen_tps", "prompt_tps")}
    m["seconds"] = round(time.time() - t0, 1)
    m["report"] = str(out.with_suffix(".report.json"))
    m["argv"] = argv
    if rep.evaluation:
        m["n_tokens"], m["text"] = rep.evaluation["n_scored_tokens"], rep.evaluation["text"]
    return m


def rule_out_threshold(cfg: SearchConfig, study) -> float | None:
    """Above this predicted KL divergence a candidate is taken not to be the answer: RULE_OUT x the best feasible
    file's measured KLD (or x --max-kld)."""
    from optuna.trial import TrialState
    if cfg.mode == "max_kld":
        return RULE_OUT * cfg.max_kld
    klds = [t.user_attrs["kld"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if max(t.user_attrs.get("constraints", [1.0])) <= 0]
    return RULE_OUT * min(klds) if klds else None


def work(cfg: SearchConfig, model, out_dir: Path, url: str, *, deadline: float | None, base_tps: float | None,
         say, worker: int = 0) -> int:
    """One worker's loop: ask, run (or reuse a finished identical trial), tell; until --trials are in the study
    or no trial could end before --budget. Returns the trials this worker finished."""
    from optuna.trial import TrialState
    study = open_study(cfg, model, url, create=False)
    space = Space(**study.user_attrs["slimlm_space"])
    host, done, durations = socket.gethostname(), 0, []
    (out_dir / "trials").mkdir(exist_ok=True)
    while True:
        trials = _counted(study.get_trials(deepcopy=False))
        started = [t for t in trials if t.state != TrialState.WAITING]
        if cfg.trials is not None and len(started) >= cfg.trials:
            break
        if deadline is not None:
            expect = sorted(durations)[len(durations) // 2] if durations else 0.0
            if time.time() + expect >= deadline:
                break
        study.sampler = _sampler(cfg, len(trials) + 7919 * worker)   # worker 0: the single-worker sequence
        with ask_lock(url):
            trial = study.ask()
        trial.set_user_attr("host", host)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("worker", worker)
        params = suggest(trial, cfg, space)
        trial.set_user_attr("params", params)
        n_started = len(started) + 1
        twin = _twin(study, trial.number, params)
        if twin is not None:                       # the sampler repeated a finished candidate: reuse it
            for k, v in twin.user_attrs.items():
                if k not in ("host", "pid", "worker", "retry_of", "params"):
                    trial.set_user_attr(k, v)
            trial.set_user_attr("same_as", twin.user_attrs.get("same_as", twin.number))
            if twin.state == TrialState.COMPLETE:
                _set_constraints(trial, twin.user_attrs["constraints"])
                study.tell(trial, twin.value)
            elif twin.state == TrialState.PRUNED:
                pr = twin.user_attrs["proxies"]
                trial.report(pr.get("predicted", pr["pruned_kld"]), 0)
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, state=TrialState.FAIL)
            say(f"{_where(n_started, cfg, deadline)}trial {trial.number}: {describe(params)} = trial {twin.number} (reused)")
            done += 1
            continue
        out = out_dir / "trials" / f"t{trial.number:04d}.gguf"
        t0, proxies = time.time(), {}
        try:
            m = run_trial(cfg, model, params, out, rule_out=rule_out_threshold(cfg, study), proxies=proxies,
                          ffn_multiple=space.ffn_multiple)
        except SlimlmError as e:                  # this candidate cannot be made (e.g. the size is unreachable)
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=TrialState.FAIL)
            say(f"{_where(n_started, cfg, deadline)}trial {trial.number}: {describe(params)}: not possible: {e}")
            done += 1
            continue
        except RuledOut as e:
            trial.set_user_attr("proxies", proxies)
            trial.set_user_attr("ruled_out", str(e))
            trial.report(proxies.get("predicted", proxies["pruned_kld"]), 0)
            study.tell(trial, state=TrialState.PRUNED)
            say(f"{_where(n_started, cfg, deadline)}trial {trial.number}: {describe(params)}: ruled out: {e} [{(time.time() - t0) / 60:.1f} min]")
            done += 1
            continue
        durations.append(time.time() - t0)
        value, cons = measured_values(cfg, m, base_tps)
        trial.set_user_attr("proxies", proxies)
        for k, v in m.items():
            trial.set_user_attr(k, v)
        _set_constraints(trial, cons)
        study.tell(trial, value)
        done += 1
        say(f"{_where(n_started, cfg, deadline)}trial {trial.number}: {describe(params)} -> {m['file_bytes'] / 2**20:.2f} MiB, KLD {m['kld']:.5f}"
            + (f", {m['gen_tps']:.1f} tok/s" if m.get("gen_tps") else "")
            + ("" if max(cons) <= 0 else " (misses the target)") + f" [{m['seconds'] / 60:.1f} min]")
    return done


def _twin(study, number: int, params: dict):
    """A finished trial with the same parameters (whose measurement is reused), or None. One still running in
    another live worker is waited for rather than run twice."""
    from optuna.trial import TrialState
    while True:
        same = [t for t in study.get_trials(deepcopy=False) if t.number != number
                and not t.user_attrs.get("stale") and t.user_attrs.get("params") == params]
        done = [t for t in same if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                or (t.state == TrialState.FAIL and "error" in t.user_attrs)]
        if done:
            return done[0]
        running = [t for t in same if t.state == TrialState.RUNNING and t.user_attrs.get("host") == socket.gethostname()
                   and _alive(t.user_attrs.get("pid"))]
        if not running:
            return None
        time.sleep(1.0)


def _alive(pid) -> bool:
    from .io import _pid_alive
    return isinstance(pid, int) and pid > 0 and pid != os.getpid() and _pid_alive(pid)


def _set_constraints(trial, cons: list[float]) -> None:
    """The target as Optuna constraints (<= 0: met), which TPE uses to prefer feasible proposals."""
    trial.set_user_attr("constraints", cons)
    for i, c in enumerate(cons):
        trial.set_constraint(f"target{i}", c)


def _where(n: int, cfg: SearchConfig, deadline: float | None) -> str:
    """Progress at the start of each trial's line: its place in --trials and the budget left."""
    parts = [f"{n}/{cfg.trials}" if cfg.trials else f"{n}"]
    if deadline is not None:
        parts.append(f"{max(deadline - time.time(), 0) / 60:.0f} min of the budget left")
    return "[" + ", ".join(parts) + "] "


def describe(p: dict) -> str:
    parts = [f"prune {p['prune']:g}"]
    if "layer_share" in p:
        parts.append(f"layer share {p['layer_share']:g}")
    if p.get("heal", "none") != "none":
        parts.append(f"heal {p['heal']}")
    parts.append(f"{p['method']} {p['qat']}" if "qat" in p else p["method"])
    if "bpw" in p:
        parts.append(f"{p['bpw']:g} bpw")
    return ", ".join(parts)


def _worker_main(cfg_dict: dict, model, out_dir: str, url: str, deadline, base_tps, worker: int, threads: int):
    """A --workers process: dies with the search process (PR_SET_PDEATHSIG), runs work()."""
    _die_with_parent()
    import torch
    torch.set_num_threads(threads)
    cfg = SearchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict.items()})
    say = lambda msg: print(f"[worker {worker}] {msg}", file=sys.stderr, flush=True)
    try:
        work(cfg, model, Path(out_dir), url, deadline=deadline, base_tps=base_tps, say=say, worker=worker)
    except SlimlmError as e:
        say(f"error: {e}")
        sys.exit(e.exit_code)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
        except OSError:
            pass


# ---- baselines -------------------------------------------------------------------------------------------------
def llama_cpp_baselines(cfg: SearchConfig, model, out_dir: Path, say, progress: bool) -> dict:
    """llama.cpp's own presets of the original (importance matrix of the same calibration text), evaluated on the
    trials' tokens; made once per search folder (baselines.json) and reused when the search resumes."""
    from .baseline import quantize_presets_with_llama_cpp
    from .calib import calibration_chunks
    from .eval import evaluate_many
    from .io import atomic_write_bytes
    from .model import load
    from .sequential import collect_imatrix
    from .visual import LLAMA_CPP, _point
    path = out_dir / "baselines.json"
    fp = cfg.fingerprint(model)
    key = {k: fp[k] for k in ("model", "baselines", "speed_of", "calib", "calib_chunks", "text", "n_ctx",
                              "max_chunks", "speed")}
    if path.is_file():
        try:
            have = json.loads(path.read_text())
            if have.get("key") == key and all(Path(p["path"]).is_file() for p in have["points"]):
                return have
        except (OSError, ValueError, KeyError, TypeError):
            pass
    presets = list(dict.fromkeys(cfg.baselines + ((cfg.speed_of,) if cfg.min_speedup is not None else ())))
    result = {"key": key, "points": []}
    if presets:
        say(f"llama.cpp's own {', '.join(presets)} of the original (importance matrix of the same text) ...")
        original = load(model, progress=progress)
        chunks, prov = calibration_chunks(original, None if cfg.calib == "default" else cfg.calib,
                                          n_ctx=cfg.n_ctx, max_chunks=cfg.calib_chunks)
        imatrix = collect_imatrix(original, chunks, dataset=prov, progress=progress)
        folder = out_dir / "llama-cpp"
        folder.mkdir(exist_ok=True)
        files = quantize_presets_with_llama_cpp(original, {p: folder / f"{p}.gguf" for p in presets},
                                                imatrix=imatrix, progress=progress)
        evs = evaluate_many(list(files.values()), original, text_path=cfg.text, n_ctx=cfg.n_ctx,
                            max_chunks=cfg.max_chunks, speed=cfg.speed, progress=progress)
        for (p, f), ev in zip(files.items(), evs, strict=True):
            result["points"].append(_point(f"llama.cpp {p}", LLAMA_CPP, ev, type=p, path=str(f)))
        del original
    atomic_write_bytes(path, (json.dumps(result, indent=1) + "\n").encode(), overwrite=True)
    return result


# ---- the command -----------------------------------------------------------------------------------------------
def search(model, out_dir: str | Path, cfg: SearchConfig, *, progress: bool = True, command: str = "") -> dict:
    """Run (or resume) the search and write OUT_DIR's results. Returns the summary (see summarize())."""
    from .io import output_lock
    from .source import check_ctx, source_info
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"-o {out_dir}: a file is there; give a folder for the search")
    if model and out_dir.resolve() == Path(model).resolve():
        raise ConfigError(f"-o {out_dir} is the model's own folder; give another folder")
    info = source_info(model)
    check_ctx(cfg.n_ctx, info)
    space = make_space(cfg, info)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)     # a line per trial, also with -q
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    deadline = None if cfg.budget_seconds is None else t_start + cfg.budget_seconds
    url = storage_url(cfg, out_dir)
    with output_lock(out_dir / "search"):
        study = open_study(cfg, model, url, create=True)
        if "slimlm_space" not in study.user_attrs:
            study.set_user_attr("slimlm_space", asdict(space))
            study.enqueue_trial(first_candidate(cfg, space))
        requeue_stale(study, out_dir, say)
        base = llama_cpp_baselines(cfg, model, out_dir, say, progress)
        base_tps = next((p["gen_tps"] for p in base["points"] if p["type"] == cfg.speed_of), None)
        if cfg.min_speedup is not None and not base_tps:
            raise ConfigError(f"--min-speedup: llama.cpp's {cfg.speed_of} of the original has no measured speed")
        say(f"searching ({cfg.mode.replace('_', ' ')}; "
            + ", ".join(x for x in (f"{cfg.trials} trials" if cfg.trials else "",
                                    f"budget {cfg.budget}" if cfg.budget else "") if x)
            + f"; {cfg.workers} worker{'s' if cfg.workers > 1 else ''}; study {cfg.study} in {url}) ...")
        if cfg.workers == 1:
            work(cfg, model, out_dir, url, deadline=deadline, base_tps=base_tps, say=say)
        else:
            _run_workers(cfg, model, out_dir, url, deadline, base_tps)
        summary = summarize(open_study(cfg, model, url, create=False), cfg, model, out_dir, base,
                            seconds=time.time() - t_start, command=command)
    return summary


def _run_workers(cfg: SearchConfig, model, out_dir: Path, url: str, deadline, base_tps) -> None:
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // cfg.workers)
    procs = [ctx.Process(target=_worker_main, args=(asdict(cfg), model and str(model), str(out_dir), url, deadline,
                                                    base_tps, i, threads)) for i in range(cfg.workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise SlimlmError(f"{len(bad)} of {cfg.workers} search workers failed (exit codes {bad}); run the same "
                          f"command again to resume")


# ---- results ---------------------------------------------------------------------------------------------------
def trial_points(study) -> list[dict]:
    from optuna.trial import TrialState

    from .visual import SLIMLM
    pts = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        u = t.user_attrs
        if "same_as" in u:
            continue
        pts.append({"label": f"trial {t.number}", "group": SLIMLM, "trial": t.number, "params": u.get("params"),
                    "file_bytes": u["file_bytes"], "bits_per_weight": u.get("bits_per_weight"), "kld": u["kld"],
                    "ppl": u.get("ppl_after"), "top1": u.get("top1_agreement"), "gen_tps": u.get("gen_tps"),
                    "prompt_tps": u.get("prompt_tps"), "n_tokens": u.get("n_tokens"), "text": u.get("text"),
                    "value": t.value, "feasible": max(u.get("constraints", [1.0])) <= 0,
                    "seconds": u.get("seconds"), "path": str(Path(u["report"]).with_suffix("").with_suffix(".gguf")),
                    "report": u["report"], "command": recipe_command(u["argv"]), "proxies": u.get("proxies", {})})
    return pts


PROXIES = {"pruned_kld": "the pruned model's KLD (torch, calibration text, before healing and quantization)",
           "model_kld": "the model's KLD before quantization (healed when healed)",
           "fisher_kld": "the size budget's Fisher prediction of the quantization's KLD",
           "predicted": "the model's KLD + the Fisher prediction"}


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None with fewer than 3 pairs or a constant side."""
    import numpy as np
    if len(a) < 3:
        return None

    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = v.argsort(kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for x in np.unique(v):                  # ties share their mean rank
            r[v == x] = r[v == x].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def proxy_rankings(pts: list[dict]) -> dict:
    """How well each cheap proxy ranked the measured KL divergences: {proxy: {"n", "spearman"}}."""
    out = {}
    for name in PROXIES:
        pairs = []
        for p in pts:
            pr = p.get("proxies") or {}
            v = pr.get(name)
            if v is not None:
                pairs.append((v, p["kld"]))
        out[name] = {"n": len(pairs), "spearman": spearman([a for a, _ in pairs], [b for _, b in pairs])}
    return out


def recipe_command(argv: list[str]) -> str:
    """The command that rebuilds a trial's file: what the trial ran, with the output named OUT.gguf."""
    argv = list(argv)
    i = argv.index("-o")
    argv[i + 1] = "OUT.gguf"
    return "slimlm " + shlex.join(argv)


def summarize(study, cfg: SearchConfig, model, out_dir: Path, base: dict, *, seconds: float, command: str) -> dict:
    """OUT_DIR's results: best.gguf (+ report), recipes.json, search.json, the plots, report.md and report.html."""
    from optuna.trial import TrialState

    from .io import atomic_output, atomic_write_bytes
    from .visual import pareto
    trials = study.get_trials(deepcopy=False)
    pts = trial_points(study)
    feasible = [p for p in pts if p["feasible"] and Path(p["path"]).is_file()]
    best = min(feasible, key=lambda p: (p["value"], p["file_bytes"])) if feasible else None
    front = pareto(pts, (("file_bytes", 1), ("kld", 1), ("gen_tps", -1)) if cfg.speed else
                   (("file_bytes", 1), ("kld", 1)))
    counts = {"finished": len(pts), "reused": sum("same_as" in t.user_attrs for t in trials),
              "not possible": sum(t.state == TrialState.FAIL and "error" in t.user_attrs and "same_as" not in t.user_attrs
                                  for t in trials),
              "ruled out by the proxy": sum(t.state == TrialState.PRUNED and "same_as" not in t.user_attrs
                                            for t in trials),
              "interrupted and rerun": sum(bool(t.user_attrs.get("stale")) for t in trials),
              "running or queued": sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)}
    if best is not None:
        for suffix in (".gguf", ".report.json", ".report.md"):
            src = Path(best["path"]).with_suffix(suffix)
            if src.is_file():
                with atomic_output(out_dir / f"best{suffix}", overwrite=True) as tmp:
                    shutil.copyfile(src, tmp)
    recipes = [{k: p[k] for k in ("trial", "params", "file_bytes", "kld", "ppl", "top1", "gen_tps", "feasible",
                                  "command")} for p in front]
    atomic_write_bytes(out_dir / "recipes.json", (json.dumps(recipes, indent=1) + "\n").encode(), overwrite=True)
    summary = {"command": command, "target": target_line(cfg), "mode": cfg.mode, "seconds": round(seconds, 1),
               "trials": counts, "best": best, "pareto": [p["trial"] for p in front],
               "baselines": base["points"], "all": pts, "config": cfg.fingerprint(model),
               "errors": {t.number: t.user_attrs["error"] for t in trials if "error" in t.user_attrs},
               "ruled_out": {t.number: t.user_attrs["ruled_out"] for t in trials if "ruled_out" in t.user_attrs
                             and "same_as" not in t.user_attrs},
               "proxy_spearman": proxy_rankings(pts)}
    atomic_write_bytes(out_dir / "search.json", (json.dumps(summary, indent=1) + "\n").encode(), overwrite=True)
    write_search_report(summary, cfg, model, out_dir, front)
    return summary


def target_line(cfg: SearchConfig) -> str:
    if cfg.mode == "target_size":
        return f"file size <= {cfg.target_size}, lowest KL divergence"
    if cfg.mode == "max_kld":
        return f"KL divergence <= {cfg.max_kld:g}, smallest file"
    return f"generation speed >= {cfg.min_speedup:g}x llama.cpp's {cfg.speed_of} of the original, lowest KL divergence"


def write_search_report(s: dict, cfg: SearchConfig, model, out_dir: Path, front: list[dict]) -> None:
    from .visual import (
        gguf_layer_widths,
        plot_frontier,
        plot_type_map,
        plot_widths,
        points_table,
        write_report,
    )
    best, base = s["best"], s["baselines"]
    pts = s["all"] + base
    md = ["# slimlm search", "", f"`{s['command']}`" if s["command"] else "", "",
          f"- target: {s['target']}", f"- model: `{model or 'the embedded SmolLM2-135M-Instruct'}`",
          "- trials: " + ", ".join(f"{v} {k}" for k, v in s["trials"].items() if v) + f"; {s['seconds'] / 60:.1f} "
          f"minutes in this run", ""]
    if best is None:
        md += ["**No trial met the target.** The files measured are below; raise the budget, loosen the target or "
               "widen the space (--max-prune, --methods, --heal).", ""]
    else:
        md += ["## Chosen file", "", f"`best.gguf` = trial {best['trial']}: {describe(best['params'])}.", "",
               f"Rebuild it with: `{best['command']}`", ""]
        near = sorted((b for b in base if b.get("kld") is not None),
                      key=lambda b: abs(b["file_bytes"] - best["file_bytes"]))
        if near:
            md += ["| file | size | KL divergence | perplexity | top-1 | gen tok/s | KLD / this file's |",
                   "|---|---|---|---|---|---|---|"]
            for p in [best] + near[:3]:
                md.append(f"| {p['label']} | {p['file_bytes'] / 2**20:.2f} MiB | {p['kld']:.6f} | "
                          f"{p['ppl']:.4f} | {100 * p['top1']:.2f}% | "
                          f"{'' if p['gen_tps'] is None else format(p['gen_tps'], '.1f')} | "
                          f"{p['kld'] / best['kld'] if best['kld'] > 0 else float('nan'):.3f} |")
            md += ["", "llama.cpp's files: the original written as F32 and quantized by `llama_model_quantize` with "
                       "the importance matrix of the same calibration text, evaluated on the same tokens in this "
                       "search.", ""]
    plot_frontier(pts, out_dir / "size-kld.png", chosen=best, title="size vs quality (every trial)")
    md += ["## Frontiers", "", "![size vs KL divergence](size-kld.png)", ""]
    if cfg.speed and any(p.get("gen_tps") for p in pts):
        plot_frontier(pts, out_dir / "speed-kld.png", x="gen_tps", chosen=best, title="speed vs quality")
        md += ["![speed vs KL divergence](speed-kld.png)", ""]
    if best is not None:
        rep = json.loads(Path(best["report"]).read_text())
        widths = {"chosen": gguf_layer_widths(best["path"])}
        ref = next((b for b in base if b.get("path") and Path(b["path"]).is_file()), None)
        if ref is not None:
            widths = {"original": gguf_layer_widths(ref["path"]), **widths}
        widths = {k: v for k, v in widths.items() if v}
        if widths:
            plot_widths(widths, out_dir / "widths.png")
            md += ["## Per-layer widths of the chosen file", "", "![per-layer widths](widths.png)", ""]
        plot_type_map(rep["export"]["tensors"], out_dir / "types.png", title="tensor types of the chosen file")
        md += ["## Tensor types of the chosen file", "", "![tensor types](types.png)", ""]
        if rep.get("healing") and rep["healing"].get("stages"):
            from .report import plot_healing
            plot_healing(rep["healing"], out_dir / "healing.png")
            md += ["## Healing of the chosen file", "", "![healing](healing.png)", ""]
    md += ["## Pareto-optimal recipes", "",
           "No other trial is smaller, closer to the original and faster at once (" + ("size, KL divergence, speed"
           if cfg.speed else "size, KL divergence") + "); each rebuilds with its command (also in `recipes.json`).",
           "", *points_table(front, with_command=True), "",
           "## Every file measured", "", *points_table(pts), ""]
    rk = s["proxy_spearman"]
    bar = f"{RULE_OUT:g}x " + ("--max-kld" if cfg.mode == "max_kld" else "the best measured file's KL divergence")
    md += ["## Cheap proxies", "",
           f"Before the expensive steps, each candidate gets cheap predictions in torch on {PROXY_CHUNKS} calibration "
           f"chunks: right after pruning, the pruned model's KL divergence to the original (an unhealed candidate "
           f"above {bar} stops there); once the size budget's types are chosen (after any healing, before GPTQ and "
           f"the evaluation), the model's KL divergence plus the budget's Fisher prediction of what quantization adds "
           f"(any candidate above {bar} stops there). {len(s['ruled_out'])} candidates were stopped. How each proxy "
           "ranked the files that were measured (Spearman's rank correlation with the measured KL divergence; "
           "1 = the same order):", "",
           "| proxy | files | Spearman |", "|---|---|---|"]
    md += [f"| {PROXIES[k]} | {v['n']} | {'' if v['spearman'] is None else format(v['spearman'], '.3f')} |"
           for k, v in rk.items()]
    md.append("")
    if s["ruled_out"]:
        md += [f"- trial {n}: {e}" for n, e in s["ruled_out"].items()] + [""]
    if s["errors"]:
        md += ["## Candidates that could not be made", ""]
        md += [f"- trial {n}: {e}" for n, e in s["errors"].items()]
        md.append("")
    md += ["Speed is llama.cpp's generation speed on this machine"
           + (" while other workers shared its cores" if cfg.workers > 1 else "") + "."]
    write_report(out_dir, md, "slimlm search")
