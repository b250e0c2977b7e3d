"""What each fuzz input kind loads, and the registry `KINDS` (kind -> strategy, target) that tests/test_fuzz.py
and bench/fuzz.py run. Targets raise SlimlmError (refused), return (accepted), or raise anything else (crash;
AssertionError for a valid-by-construction input refused or read back wrong).

The CLI kinds run `slimlm.cli.main` in-process with model loading stopped right after slimlm's strict checks
(`no_heavy_work`): whatever the arguments, no model is loaded and no llama.cpp runtime is started.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import fuzz_gguf as fg
import fuzz_hf as fh
import fuzz_inputs as fi
import numpy as np
from hypothesis import strategies as st

from slimlm.errors import SlimlmError
from slimlm.gguf.checks import check_model_gguf
from slimlm.gguf.reader import read_gguf
from slimlm.hf import check_hf_dir, read_safetensors_header


def expect_valid(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except SlimlmError as e:
        raise AssertionError(f"valid input refused: {e}") from None


# ---- GGUF ----------------------------------------------------------------------------------------------------
def t_gguf_struct(case, d: Path) -> None:
    data, spec = case
    p = fi.write_file(d, "x.gguf", data)
    if spec is None:
        read_gguf(p)
        return
    g = expect_valid(read_gguf, p)
    assert {k: fg.field_bytes(f) for k, f in g.fields.items()} == fg.expected_fields(spec), "metadata differs"
    assert [(t.name, t.shape, int(t.ggml_type)) for t in g.tensors] == \
        [(s.name, tuple(reversed(s.ne)), s.ttype) for s in spec.tensors], "tensor infos differ"
    for t, s in zip(g.tensors, spec.tensors, strict=True):
        assert bytes(g.raw(t)) == s.data, f"tensor {t.name} data differs"


def t_gguf_bytes(data: bytes, d: Path) -> None:
    """Mutated seed files: the parser, then (for a model architecture) the model-level checks."""
    g = read_gguf(fi.write_file(d, "x.gguf", data))
    for t in g.tensors:  # every accepted tensor's bytes are inside the file
        np.asarray(g.raw(t)).sum()
    if isinstance(g.get("general.architecture"), str) and g.get("general.architecture") in ("llama", "qwen2",
                                                                                            "qwen3"):
        check_model_gguf(g)


def t_model_gguf(case, d: Path) -> None:
    data, valid = case
    g = read_gguf(fi.write_file(d, "m.gguf", data))
    (expect_valid if valid else lambda f, *a: f(*a))(check_model_gguf, g)


def t_model_load(case, d: Path) -> None:
    """A full slimlm.load (transformers included) of a model GGUF whose values or types were changed."""
    from slimlm import load
    data, valid = case
    p = fi.write_file(d, "m.gguf", data)
    with fi.quiet_fds():
        m = expect_valid(load, p, progress=False) if valid else load(p, progress=False)
    assert m.logits(m.tokenizer("abc", return_tensors="pt").input_ids).isfinite().all()


# ---- safetensors and HF folders ---------------------------------------------------------------------------
def t_safetensors(case, d: Path) -> None:
    data, hdr = case
    p = fi.write_file(d, "model.safetensors", data)
    entries = expect_valid(read_safetensors_header, p) if hdr is not None else read_safetensors_header(p)
    # what slimlm accepts, the safetensors library must read (else transformers fails later, with a traceback)
    from safetensors import safe_open
    with safe_open(p, "pt") as f:
        assert set(f.keys()) == set(entries), "tensor names differ from the library's"
        for k in f.keys():
            assert tuple(f.get_slice(k).get_shape()) == entries[k].shape, f"{k}: shape differs"
            f.get_tensor(k)


def t_hf_folder(files: dict[str, bytes], d: Path) -> None:
    with fi.quiet_fds():  # check_hf_dir asks the tokenizers library, which may print warnings
        check_hf_dir(fi.write_files(d, files))


def with_config(cfg: dict) -> dict[str, bytes]:
    """The tiny folder of cfg's architecture, its config.json replaced by cfg."""
    arch = cfg["architectures"][0] if isinstance(cfg.get("architectures"), list) else "LlamaForCausalLM"
    files = fh.hf_files(arch if arch in fh.ARCH_CFG else "LlamaForCausalLM")
    files["config.json"] = fh.dumps(cfg)
    return files


def t_hf_load(files: dict[str, bytes], d: Path) -> None:
    """A full slimlm.load of a folder: what the strict checks accept, transformers and tokenizers must load."""
    from slimlm import load
    with fi.quiet_fds():
        m = load(fi.write_files(d, files))
    assert m.logits(m.tokenizer("abc", return_tensors="pt").input_ids).isfinite().all()


# ---- importance matrices ----------------------------------------------------------------------------------
def t_imatrix_gguf(case, d: Path) -> None:
    from slimlm.quant.imatrix import ImportanceMatrix
    data, valid = case
    p = fi.write_file(d, "imatrix.gguf", data)
    if not valid:
        ImportanceMatrix.load(p)
        return
    im = expect_valid(ImportanceMatrix.load, p)
    assert sorted(im.sums) == sorted(fi.IM_NAMES) and im.chunk_count == 3 and im.datasets == ["calib.txt"]
    assert [im.counts[n] for n in fi.IM_NAMES] == [100, 101]
    assert im.sums[fi.IM_NAMES[0]].tolist() == list(range(8))


def t_imatrix_dat(case, d: Path) -> None:
    from slimlm.quant.imatrix import ImportanceMatrix
    data, entries = case
    p = fi.write_file(d, "imatrix.dat", data)
    if entries is None:
        ImportanceMatrix.load(p)
        return
    im = expect_valid(ImportanceMatrix.load, p)
    for name, ncall, vals in entries:
        n = name.decode()
        assert im.counts[n] == ncall
        assert np.array_equal(im.sums[n], np.array(vals, dtype=np.float32).astype(np.float64))


# ---- command line ------------------------------------------------------------------------------------------
class ReachedLoad(BaseException):
    """Raised where a model would be loaded or llama.cpp started: the arguments got past every check."""


class CliRefused(SlimlmError):
    """The CLI exited with code 2 and one error line (argparse's usage error or slimlm's `error: ...`)."""


@contextlib.contextmanager
def no_heavy_work():
    import slimlm.eval
    import slimlm.eval.runtime
    import slimlm.model as model

    def gguf(p, *, progress=True):
        check_model_gguf(read_gguf(p))
        raise ReachedLoad

    def hf(d):
        check_hf_dir(d)
        raise ReachedLoad

    def runner(*a, **k):
        raise ReachedLoad
    saved = [(model, "_load_gguf"), (model, "_load_hf"), (slimlm.eval, "LlamaCppRunner"),
             (slimlm.eval.runtime, "LlamaCppRunner")]
    old = [getattr(m, n) for m, n in saved]
    for (m, n), new in zip(saved, (gguf, hf, runner, runner), strict=True):
        setattr(m, n, new)
    try:
        yield
    finally:
        for (m, n), v in zip(saved, old, strict=True):
            setattr(m, n, v)


PLACES = ["@gguf", "@badgguf", "@hf", "@txt", "@empty", "@missing", "@dir", "@imatrix", "@out", "@nodir/x.gguf"]
STRINGS = ["", "Q4_0", "q4_k_m", "Q9_9", "F32", "IQ4_XS", "1KB", "70MB", "70MiB", "0B", "-5MB", "1e99GB", "nan",
           "2:4", "4:2", "0:4", "1:0", "a:b", "0.5", "1.5", "-0.1", "1,2", "-1", ",", "0,0", "2x4", "4x2", "0x0",
           "smollm", "bogus", "..", "/", "-", "--", "Q4_K_M,Q8_0", "0.25,0.5", "é", "9" * 30]
INTS = ["0", "-1", "1", "2", "15", "16", "17", "64", "512", "9" * 25, "1e3", "", "x", " 7", "-0"]
FLOATS = ["0", "-0.5", "0.5", "1", "1.5", "nan", "inf", "-inf", "1e-300", "1e309", "x", "", "0.08", "0.92"]


def _value(draw, a: argparse.Action) -> list[str]:
    if a.nargs == 0:
        return []
    if a.nargs == "?" and draw(st.booleans()):
        return []
    if a.choices:
        return [draw(st.sampled_from(list(a.choices) + ["bogus", ""]))]
    kind = getattr(a.type, "__name__", None)
    pool = INTS if kind == "int" else FLOATS if kind == "float" else PLACES + STRINGS
    return [draw(st.sampled_from(pool) | st.text(max_size=6).filter(lambda s: "\0" not in s))]


@st.composite
def cli_argv(draw) -> list[str]:
    from slimlm.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    cmd = draw(st.sampled_from(sorted(sub.choices)))
    actions = [a for a in sub.choices[cmd]._actions if not isinstance(a, argparse._HelpAction)]
    argv = ["-q", cmd] if draw(st.booleans()) else [cmd]
    for a in actions:
        if not a.option_strings:
            if a.nargs != "?" or draw(st.booleans()):
                argv.append(draw(st.sampled_from(PLACES)))
        elif a.required and draw(st.integers(0, 9)):
            argv += [a.option_strings[0], draw(st.sampled_from(PLACES[-3:] + ["@out2.gguf"]))]
    for a in draw(st.lists(st.sampled_from([a for a in actions if a.option_strings]), max_size=4)):
        argv += [draw(st.sampled_from(a.option_strings))] + _value(draw, a)
    return argv


def _places(d: Path) -> dict[str, str]:
    (d / "dir").mkdir()
    hf = d / "hf"
    hf.mkdir()
    fi.write_files(hf, fh.hf_files())
    return {"@gguf": str(fi.write_file(d, "m.gguf", MODEL_GGUF)),
            "@badgguf": str(fi.write_file(d, "bad.gguf", MODEL_GGUF[:300])), "@hf": str(hf),
            "@txt": str(fi.write_file(d, "t.txt", b"hello world " * 50)),
            "@empty": str(fi.write_file(d, "e.txt", b"")), "@missing": str(d / "missing.gguf"),
            "@dir": str(d / "dir"), "@imatrix": str(fi.write_file(d, "im.gguf", IMATRIX_GGUF)),
            "@out": str(d / "out.gguf"), "@nodir": str(d / "nodir")}


def t_cli(argv: list[str], d: Path) -> None:
    from slimlm.cli import main
    places = _places(d)
    args = []
    for a in argv:
        for k in sorted(places, key=len, reverse=True):
            if a.startswith(k):
                a = places[k] + a[len(k):]
                break
        args.append(a)
    with fi.quiet() as (out, err), no_heavy_work(), fi.chdir(d):
        try:
            code = main(args)
        except SystemExit as e:  # argparse: usage errors (2) and --help (0)
            code = e.code
        except ReachedLoad:
            return
    _cli_outcome(code, err.getvalue())


def _cli_outcome(code, err: str) -> None:
    assert "Traceback" not in err, err
    if code == 0:
        return
    lines = [ln for ln in err.split("\n") if ln.strip()]  # a \r inside an echoed argument is not a new line
    assert code == 2 and lines and (lines[-1].startswith("error: ") or lines[-1].startswith("slimlm")), \
        f"exit {code}, stderr {err[-500:]!r}"
    raise CliRefused(lines[-1])


def t_inspect(case, d: Path) -> None:
    from slimlm.cli import main
    data, as_json = case
    p = fi.write_file(d, "x.gguf", data)
    with fi.quiet() as (out, err):
        code = main(["inspect", str(p)] + (["--json"] if as_json else []))
    if code == 0:
        text = out.getvalue()
        if as_json:
            json.loads(text)
        assert not any(c in text for c in "\x1b\x07\x9b\u202e"), "control characters reach the terminal"
    _cli_outcome(code, err.getvalue())


def warm_up(d: Path) -> None:
    """Import what every CLI path and full load imports lazily (transformers, torch modules: seconds the first
    time), so that the 2 s limit per case measures the case, not a first import."""
    from slimlm.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for i, cmd in enumerate(sorted(sub.choices)):
        argv = [cmd] + [v for a in sub.choices[cmd]._actions if a.required or not a.option_strings
                        for v in ((a.option_strings[:1] + ["@out"]) if a.option_strings else ["@gguf"])]
        with contextlib.suppress(SlimlmError):
            t_cli(argv, _fresh(d, f"w{i}"))
    for arch in ("llama", "qwen2", "qwen3"):  # each family's modeling module is imported on first use
        t_model_load((fg.serialize(fi.tiny_model_spec(arch))[0], True), _fresh(d, f"wg-{arch}"))
    for arch in fh.ARCH_CFG:
        t_hf_load(fh.hf_files(arch), _fresh(d, f"wh-{arch}"))


def _fresh(d: Path, name: str) -> Path:
    (d / name).mkdir(parents=True)
    return d / name


# ---- registry -------------------------------------------------------------------------------------------------
MODEL_GGUF = fg.serialize(fi.tiny_model_spec("llama"))[0]
IMATRIX_GGUF = fg.serialize(fi.imatrix_spec())[0]
GGUF_SEEDS = [MODEL_GGUF, IMATRIX_GGUF, fg.serialize(fi.tiny_model_spec("qwen2", tied=True))[0]]
ST_SEEDS = [fh.hf_files()["model.safetensors"], fh.st_bytes(*fh.st_entries({"a": (2, 3), "b": (4,)}, "F32"))]
INSPECT = st.tuples(st.one_of(fg.mutated(GGUF_SEEDS), fi.model_gguf_case().map(lambda c: c[0]),
                              fg.gguf_struct_case().map(lambda c: c[0])), st.booleans())

# kind -> (strategy, target). Full loads (transformers) are separate: slower, run fewer.
KINDS = {
    "gguf-struct": (fg.gguf_struct_case(), t_gguf_struct),
    "gguf-mutate": (fg.mutated(GGUF_SEEDS), t_gguf_bytes),
    "gguf-model": (fi.model_gguf_case(), t_model_gguf),
    "safetensors": (fh.safetensors_case(ST_SEEDS), t_safetensors),
    "config.json": (fh.config_case(), t_hf_folder),
    "tokenizer.json": (fh.tokenizer_case(), t_hf_folder),
    "shard-index": (fh.index_case(), t_hf_folder),
    "imatrix-gguf": (fi.imatrix_gguf_case(), t_imatrix_gguf),
    "imatrix-dat": (fi.imatrix_dat_case(), t_imatrix_dat),
    "cli-inspect": (INSPECT, t_inspect),
    "cli-args": (cli_argv(), t_cli),
}
# kinds run without tracemalloc: their inputs are argument values (the default model's 49k-token vocabulary is
# parsed in 0.2 s, 3 s when every allocation is traced) or whole models loaded by transformers
UNTRACED = {"cli-args", "gguf-load", "hf-load"}
# Most damaged inputs are refused by the checks in milliseconds; the rest load through transformers, so these
# kinds test that whatever slimlm's checks accept, the libraries load (or refuse as one slimlm error).
FULL_LOADS = {
    "gguf-load": (st.one_of(fi.model_gguf_case(plausible=True), fi.model_gguf_case()), t_model_load),
    "hf-load": (st.one_of(st.sampled_from(list(fh.ARCH_CFG)).flatmap(fh.plausible_config).map(with_config),
                          fh.config_case(), fh.tokenizer_case()), t_hf_load),
}
