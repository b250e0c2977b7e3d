"""Training data for healing/QAT (slimlm.train.data): --data files (text, every JSONL shape, refusals with
the line), rows/BOS/held-out split, fingerprint, the train/eval overlap check, and teacher-generated text
(deterministic per seed, deduplicated). Tiny random models with SmolLM2's tokenizer; nothing outside tests."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from slimlm import load
from slimlm.calib import default_text
from slimlm.errors import ConfigError
from slimlm.train.data import TrainData, check_no_overlap, generate_text, load_train_data, read_documents


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    return load(tiny_hf("LlamaForCausalLM"), progress=False)


@dataclass
class WithBos:
    """The tiny model as a model whose tokenizer adds BOS (SmolLM2's does not)."""
    inner: object
    add_bos: bool = True

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def bos_token_id(self) -> int:
        return 1


@dataclass
class NoBos(WithBos):
    add_bos: bool = False

    @property
    def bos_token_id(self) -> None:
        return None


def words(n: int, tag: str = "w") -> str:
    """n distinct words: no two 32-token windows of it alike."""
    return " ".join(f"{tag}{i}x" for i in range(n))


# ---- reading files --------------------------------------------------------------------------------------
def test_plain_text_file_is_one_document(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello world\nsecond line\n")
    docs = read_documents([p])
    assert len(docs) == 1
    assert docs[0][0] == "hello world\nsecond line\n"
    assert str(p) in docs[0][1] and "sha256" in docs[0][1]


def test_jsonl_every_shape(tmp_path):
    p = tmp_path / "d.jsonl"
    recs = [{"text": "plain text"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
            {"prompt": "Q: two plus two?", "completion": "four"},
            {"prompt": "Say yes: ", "response": "yes"},
            {"text": "   "}]   # blank text: skipped
    p.write_text("\n".join(json.dumps(r) for r in recs[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in recs[2:]))
    docs = read_documents([p])
    assert [t for t, _ in docs] == ["plain text", "hi\nhello there", "Q: two plus two?\nfour", "Say yes: yes"]
    assert all(prov == docs[0][1] for _, prov in docs) and "4 records" in docs[0][1]


def test_json_list_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": "one"}, {"prompt": "a", "completion": " b"}]))
    assert [t for t, _ in read_documents([p])] == ["one", "a b"]


@pytest.mark.parametrize("line, expect", [
    ("{not json", "line 3: not valid JSON"),
    ("[1, 2]", "line 3: expected a JSON object, found list"),
    ('{"title": "x"}', "line 3: no 'text', 'messages', or 'prompt'"),
    ('{"text": 5}', "line 3: 'text' is int, expected a string"),
    ('{"messages": [{"role": "user"}]}', "line 3: 'messages' must be a list of objects"),
    ('{"prompt": "x"}', "line 3: no 'text'"),
])
def test_bad_jsonl_line_is_refused_with_its_number(tmp_path, line, expect):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n\n' + line + '\n{"text": "also fine"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl") as e:
        read_documents([p])
    assert expect in str(e.value)


@pytest.mark.parametrize("content, expect", [
    (b"\x00\x01\x02binary\x00", "NUL bytes"),
    (b"caf\xe9 latin-1", "not UTF-8"),
    (b"  \n\n ", "is empty"),
])
def test_binary_non_utf8_and_empty_files_are_refused(tmp_path, content, expect):
    p = tmp_path / "x.bin"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=expect) as e:
        read_documents([p])
    assert "--data file" in str(e.value) and "x.bin" in str(e.value)


def test_missing_file_and_jsonl_without_records_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="nope.txt: cannot read"):
        read_documents([tmp_path / "nope.txt"])
    p = tmp_path / "empty.jsonl"
    p.write_text('{"text": ""}\n{"text": " "}\n')
    with pytest.raises(ConfigError, match="no record with text"):
        read_documents([p])


# ---- rows -----------------------------------------------------------------------------------------------
def test_rows_shapes_sources_and_describe(tmp_path, tiny):
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text(words(600, "a"))
    b.write_text("\n".join(json.dumps({"text": words(100, f"b{k}_")}) for k in range(3)))
    n_a = len(tiny.tokenizer(words(600, "a"), add_special_tokens=False)["input_ids"])
    d = load_train_data(tiny, [a, b], seq_len=64, n_heldout=3, progress=False)
    assert isinstance(d, TrainData)
    assert d.train.dtype == torch.int64 and d.train.shape[1] == 64 and tuple(d.heldout.shape) == (3, 64)
    assert [s["kind"] for s in d.sources] == ["file", "file"]
    assert sum(s["tokens"] for s in d.sources) == d.train.numel()
    assert abs(d.sources[0]["tokens"] - n_a) < 3 * 64          # a's tokens, less the rows held out
    assert d.describe() == (f"{d.train.numel():,} training tokens (a.txt {d.sources[0]['tokens']:,} file; "
                            f"b.jsonl {d.sources[1]['tokens']:,} file), 3 held-out sequences x 64")
    # documents are joined with EOS between them
    eos = tiny.tokenizer.eos_token_id
    assert int((torch.cat([d.train, d.heldout]) == eos).sum()) <= 3 and int((d.train == eos).sum()) >= 1


def test_bos_first_in_every_row_when_the_model_adds_bos(tmp_path, tiny):
    p = tmp_path / "a.txt"
    p.write_text(words(500))
    plain = load_train_data(tiny, [p], seq_len=32, n_heldout=2, progress=False)
    assert not tiny.add_bos and bool((plain.train[:, 0] != 1).any())
    d = load_train_data(WithBos(tiny), [p], seq_len=32, n_heldout=2, progress=False)
    assert bool((d.train[:, 0] == 1).all()) and bool((d.heldout[:, 0] == 1).all())
    # BOS is prepended, not written over text: each row holds the next 31 text tokens
    ids = torch.tensor(tiny.tokenizer(words(500), add_special_tokens=False)["input_ids"])
    assert torch.equal(d.train[0, 1:], ids[:31]) and torch.equal(d.train[1, 1:], ids[31:62])


def test_heldout_rows_are_spread_and_disjoint_from_train(tmp_path, tiny):
    p = tmp_path / "a.txt"
    text = words(2000)
    p.write_text(text)
    ids = torch.tensor(tiny.tokenizer(text, add_special_tokens=False)["input_ids"])
    d = load_train_data(tiny, [p], seq_len=64, n_heldout=4, progress=False)
    n_rows = ids.numel() // 64
    assert d.train.shape[0] + 4 == n_rows
    all_rows = ids[: n_rows * 64].reshape(n_rows, 64)
    held_at = [int(np.flatnonzero((all_rows == h).all(1))[0]) for h in d.heldout]
    assert held_at == [int((k + 0.5) * n_rows / 4) for k in range(4)] and held_at[0] > 0
    rest = [i for i in range(n_rows) if i not in held_at]
    assert torch.equal(d.train, all_rows[rest])                  # the other rows, in order
    assert not any(bool((d.train == h).all(1).any()) for h in d.heldout)


def test_max_tokens_caps_training_tokens_only(tmp_path, tiny):
    p = tmp_path / "a.txt"
    p.write_text(words(2000))
    full = load_train_data(tiny, [p], seq_len=64, progress=False)
    capped = load_train_data(tiny, [p], seq_len=64, max_tokens=1000, progress=False)
    assert capped.train.shape[0] == 1000 // 64 < full.train.shape[0]
    assert torch.equal(capped.train, full.train[: 1000 // 64]) and torch.equal(capped.heldout, full.heldout)
    assert capped.sources[0]["tokens"] == 15 * 64
    with pytest.raises(ConfigError, match="less than one sequence"):
        load_train_data(tiny, [p], seq_len=64, max_tokens=10, progress=False)


def test_too_little_text_says_how_many_tokens_are_needed(tmp_path, tiny):
    p = tmp_path / "a.txt"
    p.write_text(words(40))
    n = len(tiny.tokenizer(words(40), add_special_tokens=False)["input_ids"])
    with pytest.raises(ConfigError, match=f"has {n:,} tokens; 4 held-out .* need {5 * 256:,}"):
        load_train_data(tiny, [p], progress=False)


def test_fingerprint_is_stable_and_follows_the_data(tmp_path, tiny):
    p = tmp_path / "a.txt"
    p.write_text(words(1000))
    f1 = load_train_data(tiny, [p], seq_len=64, progress=False).fingerprint
    assert load_train_data(tiny, [p], seq_len=64, progress=False).fingerprint == f1 and len(f1) == 64
    assert load_train_data(tiny, [p], seq_len=32, progress=False).fingerprint != f1
    assert load_train_data(tiny, [p], seq_len=64, n_heldout=2, progress=False).fingerprint != f1
    p.write_text(words(1000).replace("w500x", "changed"))
    assert load_train_data(tiny, [p], seq_len=64, progress=False).fingerprint != f1


def test_bundled_text_without_files(tiny):
    d = load_train_data(tiny, None, seq_len=128, progress=False)
    assert [s["kind"] for s in d.sources] == ["bundled"] and d.sources[0]["tokens"] == d.train.numel() > 50_000
    assert "pydoc_data.topics" in d.sources[0]["source"]
    assert d.describe().endswith("bundled), 4 held-out sequences x 128")


# ---- overlap with the evaluation text ---------------------------------------------------------------------
def test_overlap_check_finds_a_copied_window_and_ignores_shorter_ones():
    g = torch.Generator().manual_seed(0)
    train = torch.randint(3, 49_000, (50, 128), generator=g)
    ev = torch.randint(3, 49_000, (5_000,), generator=g)
    check_no_overlap(train, ev)
    ev31 = ev.clone()
    ev31[100:131] = train[7, 20:51]                          # 31 shared tokens: not a 32-token window
    check_no_overlap(train, ev31)
    ev[1000:1040] = train[7, 20:60]                          # 40 shared tokens: 9 windows
    with pytest.raises(ConfigError, match=r"9 of its 4,969 32-token windows .* evaluation token 1,000 = "
                                          r"training sequence 7, token 20.*give --data text"):
        check_no_overlap(train, ev)
    ev2 = ev31.clone()
    ev2[300:332] = train[3, 0:32]                            # starts at column 0: BOS column, skipped
    check_no_overlap(train, ev2, bos=True)
    with pytest.raises(ConfigError, match="1 of its"):
        check_no_overlap(train, ev2, bos=False)


def test_eval_text_copied_into_a_data_file_is_refused(tmp_path, tiny):
    ev_text, _ = default_text("eval")
    p = tmp_path / "train.txt"
    p.write_text(words(3000) + "\n\n" + ev_text[20_000:24_000] + "\n\n" + words(1000, "z"))
    load_train_data(tiny, [p], seq_len=64, progress=False)     # no eval text given: nothing to check
    with pytest.raises(ConfigError, match=r"the --data text contains the evaluation text: [\d,]+ of its") as e:
        load_train_data(tiny, [p], seq_len=64, eval_text=ev_text, progress=False)
    assert "does not contain the evaluation text" in str(e.value)


def test_bundled_calibration_text_is_cut_where_it_repeats_the_eval_text(tiny):
    """pydoc's topics repeat each other ('compound' holds 'class', 'if', ...), so the bundled calibration
    split shares 32-token windows with the eval split: those are cut, counted, and the rest passes."""
    ev_text, _ = default_text("eval")
    cal_text, _ = default_text("calib")
    ev = torch.tensor(tiny.tokenizer(ev_text, add_special_tokens=False)["input_ids"])
    cal = torch.tensor(tiny.tokenizer(cal_text, add_special_tokens=False)["input_ids"])
    n = cal.numel() // 256
    with pytest.raises(ConfigError, match="contains the evaluation text"):
        check_no_overlap(cal[: n * 256].reshape(n, 256), ev, bos=False)
    d = load_train_data(tiny, None, seq_len=256, eval_text=ev_text, progress=False)
    removed = d.sources[0]["removed_tokens"]
    assert 0 < removed < 0.2 * cal.numel()
    check_no_overlap(torch.cat([d.train, d.heldout]), ev, bos=False)
    assert f"{removed:,} repeating the evaluation text cut" in d.describe()


# ---- generated text ---------------------------------------------------------------------------------------
def test_generation_is_deterministic_per_seed(tiny):
    a, sa = generate_text(tiny, 48, seed=0, batch=4, max_new=8, progress=False)
    b, _ = generate_text(tiny, 48, seed=0, batch=4, max_new=8, progress=False)
    c, _ = generate_text(tiny, 48, seed=1, batch=4, max_new=8, progress=False)
    assert a == b and a != c
    assert sa["kept_tokens"] >= 48 and sa["generated_tokens"] >= sa["kept_tokens"] and sa["duplicates"] == 0
    # 4 samples of 8 tokens, then 4 of 4 (a last batch is no longer than still needed)
    assert sa["samples"] == 8 and len(a) == 8 and sa["kept_tokens"] == sa["generated_tokens"] == 48
    assert all(isinstance(t, str) and t.strip() for t in a)


def test_generation_drops_duplicates(tiny):
    # near-greedy from the same first token: every sample is the same text (later, shorter ones its start);
    # one is kept, the rest are duplicates, and it gives up after 4x the tokens asked for
    texts, st = generate_text(WithBos(tiny), 40, seed=0, temperature=1e-4, batch=4, max_new=10, progress=False)
    assert len(texts) == 1 and st["kept_tokens"] == 10
    assert st["duplicates"] == st["samples"] - 1 == 19 and 160 <= st["generated_tokens"] < 200


def test_generation_without_bos_samples_the_first_token(tiny):
    texts, st = generate_text(NoBos(tiny), 20, seed=3, temperature=1e-4, batch=4, max_new=10, progress=False)
    assert len(texts) >= 2 and len(set(texts)) == len(texts)   # different first tokens: different samples
    with pytest.raises(ConfigError, match="top_p"):
        generate_text(tiny, 10, top_p=0, progress=False)
    with pytest.raises(ConfigError, match="temperature"):
        generate_text(tiny, 10, temperature=0, progress=False)


def test_generated_text_joins_the_bundled_text(tiny):
    d = load_train_data(tiny, None, seq_len=128, generate_tokens=300, teacher=tiny, progress=False)
    assert [s["kind"] for s in d.sources] == ["bundled", "generated"]
    gen = d.sources[1]
    assert gen["generation"]["kept_tokens"] >= 300 and gen["tokens"] > 0
    assert f"; {gen['tokens']:,} generated)" in d.describe()
    with pytest.raises(ConfigError, match="needs a teacher"):
        load_train_data(tiny, None, generate_tokens=10, progress=False)


@pytest.mark.parametrize("V, scale", [(50_000, 6.0), (6_000, 0.5), (300, 0.3)])   # peaked / flat / small
def test_nucleus_sampling_draws_from_the_nucleus_in_proportion(V, scale):
    from slimlm.train.data import _sample_next
    torch.manual_seed(0)
    logits = torch.randn(1, V) * scale
    other = torch.randn(1, V) * (6.0 if scale < 1 else 3.0)      # a row of the other kind in the same batch
    batch = torch.cat([logits, other, logits, other, logits, logits])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([_sample_next(batch, 1.0, 0.9, gen) for _ in range(120)])[:, [0, 2, 4, 5]].reshape(-1)
    p = torch.softmax(logits[0].double(), -1)
    ps, idx = p.sort(descending=True)
    n_keep = int((ps.cumsum(0) < 0.9).sum()) + 1
    nucleus = set(idx[:n_keep].tolist())
    assert set(draws.tolist()) <= nucleus                            # never outside the nucleus
    top = int(idx[0])
    expect = float(ps[0] / ps[:n_keep].sum())
    got = float((draws == top).double().mean())
    assert abs(got - expect) < 4 * (expect * (1 - expect) / draws.numel()) ** 0.5 + 1e-3
    assert len(set(draws.tolist())) > min(0.5 * n_keep, 100)        # spread over the nucleus, not one token
