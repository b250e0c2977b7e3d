"""Scoring against closed-form values; chunking as llama.cpp's perplexity tool does it."""
from __future__ import annotations

import math

import pytest
import torch

from slimlm.calib import default_text
from slimlm.errors import ConfigError
from slimlm.eval.metrics import Scores, make_chunks, scored_slice


def test_chunks_replace_first_token_with_bos_and_drop_remainder():
    t = torch.arange(10, 35)
    c = make_chunks(t, 8, bos_id=1, max_chunks=None)
    assert c.shape == (3, 8) and c[:, 0].tolist() == [1, 1, 1] and c[1, 1:].tolist() == list(range(19, 26))
    assert make_chunks(t, 8, None, 2)[:, 0].tolist() == [10, 18]
    with pytest.raises(ConfigError, match="fewer than one chunk"):
        make_chunks(t[:5], 8, None, None)


def test_scored_positions_are_second_half():
    pos, tgt = scored_slice(8)
    assert list(range(8))[pos] == [4, 5, 6] and list(range(8))[tgt] == [5, 6, 7]


def test_uniform_logits_give_vocab_perplexity_and_zero_kld():
    V, T = 50, 7
    s = Scores()
    logits = torch.zeros(T, V)
    s.add(logits, torch.randint(0, V, (T,)), logits.clone())
    r = s.result()
    assert r["ppl"] == pytest.approx(V) and r["kld"] == pytest.approx(0, abs=1e-12)
    assert r["top1_agreement"] == 1.0


def test_kld_matches_closed_form():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    q = torch.tensor([[0.2, 0.5, 0.3]])
    s = Scores()
    s.add(q.log(), torch.tensor([0]), p.log())
    want = sum(pi * math.log(pi / qi) for pi, qi in zip(p[0].tolist(), q[0].tolist(), strict=True))
    r = s.result()
    assert r["kld"] == pytest.approx(want, rel=1e-6)
    assert r["ppl"] == pytest.approx(1 / 0.2, rel=1e-6) and r["ref_ppl"] == pytest.approx(1 / 0.7, rel=1e-6)
    assert r["top1_agreement"] == 0.0


def test_default_texts_are_disjoint_and_deterministic():
    ev, src = default_text("eval")
    ca, _ = default_text("calib")
    assert len(ev) > 50_000 and len(ca) > 200_000 and "index % 4 == 3" in src
    assert ev == default_text("eval")[0]
    from pydoc_data.topics import topics
    assert all((topics[k] in ev) != (topics[k] in ca) for k in topics)  # each topic in exactly one split
