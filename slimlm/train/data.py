"""Training text for healing and QAT: the user's files (`--data`, text or JSONL), or with none the bundled
calibration text plus text the teacher generates itself, tokenized into fixed-length rows.

Why each piece:
- Files: plain text is read like every other text slimlm reads (`calib.read_text`); JSONL holds one
  document per line in the shapes fine-tuning sets use ("text", chat "messages", "prompt"+"completion").
  Parsed with `json` only: nothing is ever evaluated or unpickled.
- Self-generated text (LLM-QAT, Liu et al. 2023, https://arxiv.org/abs/2305.17888): sampling from the
  teacher gives text from the very distribution the student must reproduce, with no data to ship. Sampled
  with a seeded `torch.Generator` (same seed, same text), deduplicated (exact repeats and repeats of the
  first 32 tokens), and counted, so the report says how many tokens came from where.
- Rows: documents are joined with EOS between them and cut into `seq_len` rows, BOS first when the model
  adds BOS (prepended, so no text token is lost); a deterministic spread of rows is held out for the
  trainer's evaluation; the rest stays in order (the trainer shuffles per epoch).
- Training and evaluation text never overlap: `check_no_overlap` hashes every 32-token window (a
  polynomial hash in uint64, vectorised in numpy) and refuses training data that holds evaluation text.
- `fingerprint` names the exact token data, so a resumed run refuses a different dataset.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..calib import default_text, read_text
from ..errors import ConfigError

FLAG = "--data file"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
OVERLAP_N = 32                        # training and evaluation text share no 32-token window
PREFIX_DEDUP = 32                     # samples whose first 32 tokens repeat an earlier one are dropped
GENERATE_BATCH = 16                   # SmolLM2, this CPU: 58 tok/s at 16 samples a step, 45 at 8
GIVE_UP_FACTOR = 4                    # generation stops after 4x the wanted tokens, however many were kept
HASH_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the rolling window hash


@dataclass(frozen=True, eq=False)
class TrainData:
    """Token rows for training and for the trainer's held-out evaluation, with provenance."""
    train: torch.Tensor          # (n_seq, seq_len) int64; BOS first in each row when the model adds BOS
    heldout: torch.Tensor        # (n_heldout, seq_len) int64, rows disjoint from train, same sources
    sources: tuple[dict, ...]    # {"source": provenance, "kind": "file"|"bundled"|"generated", "tokens": train tokens, "name"}
    fingerprint: str             # sha256 over seq_len, row counts and the token bytes

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.train.numel())

    def describe(self) -> str:
        """One line: '612,352 training tokens (brown-calib.txt 600,000 file; 12,352 generated), 4 held-out
        sequences x 256'."""
        parts = [(f"{s['tokens']:,} generated" if s["kind"] == "generated" else f"{s['name']} {s['tokens']:,} {s['kind']}")
                 + (f", {s['removed_tokens']:,} repeating the evaluation text cut" if s.get("removed_tokens") else "")
                 for s in self.sources]
        n_h = self.heldout.shape[0]
        return (f"{self.n_tokens:,} training tokens ({'; '.join(parts)}), "
                f"{n_h} held-out sequence{'s' if n_h != 1 else ''} x {self.seq_len}")


# ---- reading files ---------------------------------------------------------------------------------------
def read_documents(paths: Sequence[str | Path]) -> list[tuple[str, str]]:
    """(text, provenance) per document: a plain-text file is one document; a .jsonl/.ndjson file (or a .json
    file holding JSON lines or one list of records) gives one document per record, all with the file's
    provenance. Errors are ConfigError naming the --data file (and the line of a bad record)."""
    docs: list[tuple[str, str]] = []
    for path in paths:
        p = Path(path)
        text, prov = read_text(p, flag=FLAG)
        if p.suffix.lower() in JSONL_SUFFIXES + (".json",):
            records = _json_records(p, text)
            prov = f"{prov.rsplit(', ', 1)[0]}, {len(records)} records)"
            docs += [(r, prov) for r in records]
        else:
            docs.append((text, prov))
    return docs


def _json_records(p: Path, text: str) -> list[str]:
    """Document texts of a JSON-lines file (or a .json file with one list of records)."""
    if p.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{FLAG} {p}: not valid JSON (line {e.lineno}: {e.msg})") from None
        lines = [(i + 1, item) for i, item in enumerate(items)]
        where = "record"
    else:
        lines = []
        for no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                lines.append((no, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{FLAG} {p} line {no}: not valid JSON ({e.msg} at column {e.colno})") from None
        where = "line"
    records = [t for no, obj in lines if (t := _record_text(obj, f"{FLAG} {p} {where} {no}")).strip()]
    if not records:
        raise ConfigError(f"{FLAG} {p} holds no record with text")
    return records


def _record_text(obj, where: str) -> str:
    """The text of one JSON record: "text"; or "messages" [{role, content}] joined with newlines; or
    "prompt" + "completion"/"response"."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if "text" in obj:
        return _string(obj["text"], "text", where)
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "content" in m for m in msgs):
            raise ConfigError(f"{where}: 'messages' must be a list of objects with 'role' and 'content'")
        return "\n".join(_string(m["content"], "messages[].content", where) for m in msgs)
    answer = next((k for k in ("completion", "response") if k in obj), None)
    if "prompt" in obj and answer is not None:
        prompt, completion = _string(obj["prompt"], "prompt", where), _string(obj[answer], answer, where)
        glue = "" if not prompt or not completion or prompt[-1].isspace() or completion[0].isspace() else "\n"
        return prompt + glue + completion
    raise ConfigError(f"{where}: no 'text', 'messages', or 'prompt' with 'completion'/'response' "
                      f"(keys: {', '.join(sorted(obj)) or 'none'})")


def _string(v, key: str, where: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{where}: '{key}' is {type(v).__name__}, expected a string")
    if "\0" in v:
        raise ConfigError(f"{where}: '{key}' holds NUL characters")
    return v


# ---- text generated by the teacher -----------------------------------------------------------------------
def generate_text(teacher, n_tokens: int, *, seed: int = 0, temperature: float = 1.0, top_p: float = 0.95,
                  batch: int = 8, max_new: int = 256, progress: bool = True) -> tuple[list[str], dict]:
    """Sample texts from the teacher until `n_tokens` new tokens are kept (LLM-QAT's data-free text).

    Each sample starts from BOS when the model adds BOS (else from a first token drawn uniformly from the
    non-special vocabulary, as LLM-QAT does) and runs until EOS or `max_new` tokens (fewer in a last batch
    that needs fewer), `batch` samples at a time with a KV cache; nucleus sampling (`top_p`) at
    `temperature`, from a `torch.Generator` seeded with `seed`. A sample whose first 32 tokens (all of
    them when shorter) repeat the start of an earlier kept sample is dropped as a duplicate, exact repeats
    included. Gives up after generating 4x `n_tokens`. Returns (texts, {"generated_tokens", "kept_tokens", "duplicates",
    "empty", "samples", "seconds"})."""
    if n_tokens < 1:
        raise ConfigError(f"the number of tokens to generate must be >= 1, got {n_tokens}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if batch < 1 or max_new < 1:
        raise ConfigError(f"batch and max_new must be >= 1, got batch {batch}, max_new {max_new}")
    module, tok = teacher.module, teacher.tokenizer
    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    eos = _eos_id(teacher)
    first = _first_tokens(teacher, module.config.vocab_size)
    texts: list[str] = []
    seen: set[tuple[int, ...]] = set()     # every start (1..32 tokens) of every kept sample
    st = {"generated_tokens": 0, "kept_tokens": 0, "duplicates": 0, "empty": 0, "samples": 0}
    t0 = time.perf_counter()
    with tqdm(total=n_tokens, desc="generating training text", unit="tok", disable=not progress,
              leave=False) as bar:
        while st["kept_tokens"] < n_tokens and st["generated_tokens"] < GIVE_UP_FACTOR * n_tokens:
            steps = min(max_new, -(-(n_tokens - st["kept_tokens"]) // batch))   # no longer than still needed
            for ids in _sample_batch(module, first, batch, steps, eos, temperature, top_p, gen, device):
                st["generated_tokens"] += len(ids)
                st["samples"] += 1
                text = tok.decode(ids, skip_special_tokens=True)
                if not text.strip():
                    st["empty"] += 1
                elif tuple(ids[:PREFIX_DEDUP]) in seen:
                    st["duplicates"] += 1
                elif st["kept_tokens"] < n_tokens:
                    seen.update(tuple(ids[:m]) for m in range(1, min(len(ids), PREFIX_DEDUP) + 1))
                    texts.append(text)
                    st["kept_tokens"] += len(ids)
                    bar.update(len(ids))
            bar.set_postfix(duplicates=st["duplicates"])
    st["seconds"] = time.perf_counter() - t0
    return texts, st


def _eos_id(model) -> int | None:
    """The model's EOS id (the GGUF's when loaded from one, as llama.cpp sees it)."""
    if getattr(model, "gguf", None) is not None:
        v = model.gguf.get("tokenizer.ggml.eos_token_id")
        if v is not None:
            return int(v)
    return model.tokenizer.eos_token_id


def _first_tokens(model, n_vocab: int):
    """BOS id when the model adds BOS (as llama.cpp will), else the candidate first tokens (non-special ids)."""
    if model.add_bos and model.bos_token_id is not None:
        return int(model.bos_token_id)
    special = set(model.tokenizer.all_special_ids)
    return torch.tensor([i for i in range(min(n_vocab, len(model.tokenizer))) if i not in special])


@torch.inference_mode()
def _sample_batch(module, first, batch: int, max_new: int, eos: int | None, temperature: float, top_p: float,
                  gen: torch.Generator, device) -> list[list[int]]:
    """`batch` samples: new token ids per sample (BOS excluded, cut before EOS)."""
    if isinstance(first, int):
        x = torch.full((batch, 1), first, dtype=torch.long, device=device)
        out_ids: list[torch.Tensor] = []
    else:   # no BOS: the first token is drawn uniformly and is part of the text
        pick = torch.randint(len(first), (batch,), generator=gen, device=device)
        x = first.to(device)[pick][:, None]
        out_ids = [x[:, 0]]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    kw = _cache_kw(module)
    past = None
    for _ in range(max_new - len(out_ids)):
        out = module(input_ids=x, use_cache=True, **{kw: past})
        past = getattr(out, kw)
        nxt = _sample_next(out.logits[:, -1, :].float(), temperature, top_p, gen)   # (batch,)
        out_ids.append(torch.where(done, torch.full_like(nxt, -1), nxt))
        if eos is not None:
            done |= nxt == eos
        if bool(done.all()):
            break
        x = nxt[:, None]
    ids = torch.stack(out_ids, 1).cpu().tolist()   # (batch, steps)
    return [_until(row, eos) for row in ids]


def _cache_kw(module) -> str:
    """The KV-cache argument (and output field) name: 'cache' from transformers 5.2x, 'past_key_values' before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _until(row: list[int], eos: int | None) -> list[int]:
    """Tokens before the first EOS (or padding -1)."""
    for i, t in enumerate(row):
        if t == eos or t < 0:
            return row[:i]
    return row


def _sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Nucleus sampling by inverse CDF: logits (batch, vocab) -> token ids (batch,). Each row's nucleus (its
    most probable tokens whose mass first reaches top_p) is looked for among its top 256, then 4096, then all
    tokens, only the rows that need it going further: exact, and ~25x cheaper than sorting the vocabulary
    for the peaked rows."""
    probs = torch.softmax(logits / temperature, dim=-1)
    B, V = probs.shape
    u = torch.rand(B, 1, generator=gen, device=probs.device)
    if top_p >= 1:
        c = probs.cumsum(-1)
        return torch.searchsorted(c, u * c[:, -1:]).clamp_max(V - 1)[:, 0]
    out = torch.empty(B, dtype=torch.long, device=probs.device)
    todo = torch.arange(B, device=probs.device)
    for k in (min(256, V), min(4096, V), V):
        p_k, i_k = probs[todo].sort(dim=-1, descending=True) if k == V else probs[todo].topk(k, dim=-1)
        c = p_k.cumsum(-1)                                              # (rows, k), largest first
        ok = (c[:, -1] >= top_p) | (k == V)
        n_keep = ((c[ok] < top_p).sum(-1, keepdim=True) + 1).clamp_max(k)   # (ok rows, 1)
        j = torch.searchsorted(c[ok], u[todo[ok]] * c[ok].gather(1, n_keep - 1))
        out[todo[ok]] = i_k[ok].gather(1, torch.minimum(j, n_keep - 1))[:, 0]
        todo = todo[~ok]
        if todo.numel() == 0:
            break
    return out


# ---- rows --------------------------------------------------------------------------------------------------
def load_train_data(model, paths: Sequence[str | Path] | None, *, seq_len: int = 256, n_heldout: int = 4,
                    generate_tokens: int = 0, teacher=None, eval_text: str | None = None,
                    max_tokens: int | None = None, seed: int = 0, progress: bool = True) -> TrainData:
    """Training rows from `paths` (text/JSONL files), or with none the bundled calibration text; plus
    `generate_tokens` tokens sampled from `teacher` when > 0. Rows of `seq_len` tokens (BOS first when
    `model.add_bos`), `n_heldout` rows held out (spread evenly over the data, the same whatever
    `max_tokens`), train = the other rows in order, the first `max_tokens // seq_len` of them when capped.
    `eval_text`: the text slimlm will evaluate on. The bundled and generated text are cut where they repeat
    it (counted in the source's "removed_tokens"); --data files that hold it are refused."""
    if seq_len < 8:
        raise ConfigError(f"the training sequence length must be >= 8, got {seq_len}")
    if n_heldout < 0:
        raise ConfigError(f"the number of held-out sequences must be >= 0, got {n_heldout}")
    if max_tokens is not None and max_tokens < seq_len:
        raise ConfigError(f"the training token cap ({max_tokens}) is less than one sequence of {seq_len} tokens")
    if generate_tokens < 0:
        raise ConfigError(f"the number of tokens to generate must be >= 0, got {generate_tokens}")
    if generate_tokens > 0 and teacher is None:
        raise ConfigError("generating training text needs a teacher model")
    sources = _gather(paths, generate_tokens, teacher, seed, progress)
    bos = model.bos_token_id if model.add_bos else None
    ev = None if eval_text is None else np.asarray(model.tokenizer(eval_text, add_special_tokens=False)["input_ids"],
                                                   dtype=np.int64)
    stream, src_of, removed = _token_stream(model, sources, ev)
    rows, row_src = _rows(stream, src_of, seq_len, bos, n_heldout)
    held_idx = _spread(rows.shape[0], n_heldout)
    train_mask = np.ones(rows.shape[0], dtype=bool)
    train_mask[held_idx] = False
    train_idx = np.flatnonzero(train_mask)
    if max_tokens is not None:
        train_idx = train_idx[: max_tokens // seq_len]
    train, heldout = torch.from_numpy(rows[train_idx]), torch.from_numpy(rows[held_idx])
    counts = np.bincount(row_src[train_idx].ravel(), minlength=len(sources))
    recs = tuple(dict(meta, tokens=int(c), removed_tokens=r)
                 for (meta, _), c, r in zip(sources, counts, removed, strict=True))
    if ev is not None:
        check_no_overlap(torch.cat([train, heldout]), torch.from_numpy(ev), bos=bos is not None,
                         what="the --data text" if paths else "the training data", tokenizer=model.tokenizer)
    return TrainData(train, heldout, recs, _fingerprint(train, heldout))


def _gather(paths, generate_tokens: int, teacher, seed: int, progress: bool) -> list[tuple[dict, list[str]]]:
    """[(source record without 'tokens', document texts)] in order."""
    out: dict[str, tuple[dict, list[str]]] = {}
    if paths:
        for text, prov in read_documents(paths):
            name = Path(prov.split(" (sha256 ", 1)[0]).name
            out.setdefault(prov, ({"source": prov, "kind": "file", "name": name}, []))[1].append(text)
    else:
        text, prov = default_text("calib")
        out[prov] = ({"source": prov, "kind": "bundled", "name": "bundled calibration text"}, [text])
    if generate_tokens > 0:
        texts, st = generate_text(teacher, generate_tokens, seed=seed, batch=GENERATE_BATCH, progress=progress)
        if not texts:
            raise ConfigError(f"the teacher generated no usable text in {st['samples']} samples "
                              f"({st['duplicates']} duplicates, {st['empty']} empty); give --data files")
        prov = (f"generated by the teacher (seed {seed}): {len(texts)} samples kept of {st['samples']}, "
                f"{st['kept_tokens']:,} of {st['generated_tokens']:,} tokens, {st['duplicates']} duplicates "
                f"dropped, {st['seconds']:.0f} s")
        out[prov] = ({"source": prov, "kind": "generated", "name": "generated", "generation": st}, texts)
    return list(out.values())


def _token_stream(model, sources: list[tuple[dict, list[str]]],
                  eval_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """All documents' tokens joined with EOS (or the tokens of a blank line) between them, the source index
    of every token, and per source the tokens cut because they repeat the evaluation text (bundled and
    generated text only: a user's file is refused by the final check, never silently edited)."""
    eos = _eos_id(model)
    sep = np.asarray([eos] if eos is not None else model.tokenizer("\n\n", add_special_tokens=False)["input_ids"],
                     dtype=np.int64)
    eh = None if eval_ids is None or eval_ids.size < OVERLAP_N else np.unique(_window_hashes(eval_ids, OVERLAP_N))
    parts, src, removed = [], [], [0] * len(sources)
    for g, (meta, docs) in enumerate(sources):
        for ids in model.tokenizer(docs, add_special_tokens=False)["input_ids"]:
            ids = np.asarray(ids, dtype=np.int64)
            pieces = [ids] if eh is None or meta["kind"] == "file" else _cut_overlap(ids, eh, OVERLAP_N)
            removed[g] += ids.size - sum(p.size for p in pieces)
            for piece in pieces:
                if parts:
                    parts += [sep]
                    src += [np.full(sep.size, g, dtype=np.int32)]
                parts += [piece]
                src += [np.full(piece.size, g, dtype=np.int32)]
    if not parts:
        raise ConfigError("the training data is empty once the text that repeats the evaluation text is removed")
    return np.concatenate(parts), np.concatenate(src), removed


def _cut_overlap(ids: np.ndarray, eval_hashes: np.ndarray, n: int) -> list[np.ndarray]:
    """The pieces of `ids` left after removing every n-token window found in the evaluation text (hashes,
    sorted); pieces shorter than n are dropped."""
    if ids.size < n:
        return [ids]
    starts = np.flatnonzero(np.isin(_window_hashes(ids, n), eval_hashes, assume_unique=False))
    if starts.size == 0:
        return [ids]
    cover = np.zeros(ids.size + 1, dtype=np.int64)
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    keep = np.concatenate([[False], np.cumsum(cover)[:-1] == 0, [False]])
    edges = np.diff(keep.astype(np.int8))
    return [ids[a:b] for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True)
            if b - a >= n]


def _rows(stream: np.ndarray, src_of: np.ndarray, seq_len: int, bos: int | None,
          n_heldout: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_rows, seq_len) token rows and the source index of each token (BOS: the row's first text token's)."""
    body = seq_len - (bos is not None)
    n = stream.size // body
    if n < n_heldout + 1:
        raise ConfigError(f"the training data has {stream.size:,} tokens; {n_heldout} held-out sequence(s) and "
                          f"at least one training sequence of {seq_len} need {(n_heldout + 1) * body:,}: "
                          f"give more --data text, generate more, or a smaller sequence length")
    rows, srcs = stream[: n * body].reshape(n, body), src_of[: n * body].reshape(n, body)
    if bos is not None:
        rows = np.concatenate([np.full((n, 1), bos, dtype=np.int64), rows], 1)
        srcs = np.concatenate([srcs[:, :1], srcs], 1)
    return np.ascontiguousarray(rows), srcs


def _spread(n_rows: int, k: int) -> np.ndarray:
    """k distinct row indices spread evenly over n_rows > k rows, the middle of each of k equal parts."""
    return ((np.arange(k) + 0.5) * n_rows / k).astype(np.int64) if k else np.zeros(0, dtype=np.int64)


def _fingerprint(train: torch.Tensor, heldout: torch.Tensor) -> str:
    h = hashlib.sha256(b"slimlm-train-data-v1")
    h.update(np.asarray([train.shape[1], train.shape[0], heldout.shape[0]], dtype="<i8").tobytes())
    for t in (train, heldout):
        h.update(np.ascontiguousarray(t.numpy(), dtype="<i8").tobytes())
    return h.hexdigest()


# ---- training and evaluation text never overlap -----------------------------------------------------------
def _window_hashes(t: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash (mod 2^64) of every n-token window along the last axis: (..., L) -> (..., L - n + 1)."""
    w = t.shape[-1] - n + 1
    h = np.zeros(t.shape[:-1] + (w,), dtype=np.uint64)
    v = t.astype(np.uint64) + np.uint64(1)
    for j in range(n):
        h *= HASH_MUL
        h += v[..., j: j + w]
    return h


def check_no_overlap(train: torch.Tensor, eval_tokens: torch.Tensor, *, n: int = OVERLAP_N, what: str = "",
                     bos: bool = True, tokenizer=None) -> None:
    """Refuse (ConfigError) training rows (n_seq, seq_len) that hold any n-token window of the evaluation
    tokens (n,). Windows are compared within rows; the first column is skipped when it is BOS (`bos`).
    With `tokenizer`, the message quotes the first shared text."""
    ev = eval_tokens.reshape(-1).numpy()
    rows = train.numpy()[:, 1:] if bos else train.numpy()
    if ev.size < n or rows.shape[1] < n or rows.shape[0] == 0:
        return
    eh = _window_hashes(ev, n)                      # (n_eval - n + 1,)
    th = _window_hashes(rows, n)                    # (n_seq, L - n + 1)
    hit = np.isin(eh, th)
    k = int(hit.sum())
    if k == 0:
        return
    i = int(np.flatnonzero(hit)[0])
    r, c = (int(a[0]) for a in np.nonzero(th == eh[i]))
    c += bos
    snippet = f": {tokenizer.decode(ev[i: i + n].tolist())[:80]!r}" if tokenizer is not None else ""
    raise ConfigError(
        f"{what or 'the training data'} contains the evaluation text: {k:,} of its {eh.size:,} {n}-token windows "
        f"appear in training sequences (the first at evaluation token {i:,} = training sequence {r}, token {c}"
        f"{snippet}). Training on the evaluation text would make its scores meaningless: give --data text that "
        f"does not contain the evaluation text, or evaluate on a different --text")
