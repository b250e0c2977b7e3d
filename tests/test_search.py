"""slimlm search (Optuna study as the trial journal) and slimlm report (plots, self-contained HTML), on a tiny
model: resume after kill -9 without rerunning finished trials, two workers on one sqlite study, the results
folder, the plots' axes, and the refusals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimlm.cli import main
from slimlm.errors import ConfigError

pytestmark = pytest.mark.usefixtures("llama_cpp_available")


def _args(model, out, calib, *extra) -> list[str]:
    """A small search: no pruning, bits per weight and the method searched, KL divergence <= 0.05 at the smallest
    size; four-chunk evaluation, no speed rounds (their values vary run to run), no llama.cpp baselines."""
    return ["-q", "search", str(model), "-o", str(out), "--max-kld", "0.05", "--max-prune", "0",
            "--methods", "rtn,gptq", "--calib", str(calib), "--text", str(calib), "--calib-chunks", "2",
            "--ctx", "64", "--chunks", "4", "--no-speed", "--baselines", "none", "--seed", "3", *extra]


def _sequence(out: Path) -> list[tuple]:
    """The study's trials in order, those a kill interrupted left out: (parameters, objective, KLD)."""
    import optuna
    st = optuna.load_study(study_name="slimlm-search", storage=f"sqlite:///{out / 'study.db'}")
    return [(t.user_attrs.get("params"), t.value, t.user_attrs.get("kld")) for t in st.get_trials()
            if not t.user_attrs.get("stale")]


def _trials(out: Path):
    import optuna
    return optuna.load_study(study_name="slimlm-search", storage=f"sqlite:///{out / 'study.db'}").get_trials()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, src, calib):
    out = tmp_path_factory.mktemp("search") / "a"
    assert main(_args(src, out, calib, "--trials", "5")) == 0
    return out


def test_search_writes_the_best_file_its_recipes_and_a_self_contained_report(uninterrupted, src, calib, tmp_path):
    out = uninterrupted
    s = json.loads((out / "search.json").read_text())
    assert len(_sequence(out)) == 5
    best = s["best"]
    assert best is not None and best["kld"] <= 0.05
    feasible = [p for p in s["all"] if p["kld"] <= 0.05]
    assert best["file_bytes"] == min(p["file_bytes"] for p in feasible)     # the smallest file that meets it
    assert (out / "best.gguf").read_bytes() == Path(best["path"]).read_bytes()
    recipes = json.loads((out / "recipes.json").read_text())
    assert recipes and all(r["command"].startswith("slimlm compress ") for r in recipes)
    front = {(r["file_bytes"], r["kld"]) for r in recipes}
    for p in s["all"]:             # nothing measured beats a Pareto-optimal recipe on both size and KLD
        assert not any(p["file_bytes"] < b and p["kld"] < k for b, k in front)
    # the recipe rebuilds the same file
    r = next(r for r in recipes if r["trial"] == best["trial"])
    argv = r["command"].split()[1:]
    rebuilt = tmp_path / "rebuilt.gguf"
    argv[argv.index("OUT.gguf")] = str(rebuilt)
    assert main(["-q", *argv]) == 0
    assert rebuilt.read_bytes() == (out / "best.gguf").read_bytes()
    html = (out / "report.html").read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html and "<link" not in html
    pngs = sorted(out.glob("*.png"))
    assert {"size-kld.png", "types.png"} <= {p.name for p in pngs}
    assert html.count('src="data:image/png;base64,') == len(pngs)
    assert all(p.stat().st_size > 5000 for p in pngs)


def test_killed_search_resumes_without_rerunning_finished_trials_and_ends_as_uninterrupted(uninterrupted, src, calib,
                                                                                           tmp_path):
    """kill -9 while a trial runs, then the same command: the trials that finished are not rerun (same
    numbers, same completion times), the interrupted one runs again with its parameters, and the study ends
    with the uninterrupted search's sequence of candidates and measurements."""
    out = tmp_path / "b"
    args = _args(src, out, calib, "--trials", "5")
    proc = subprocess.Popen([sys.executable, "-m", "slimlm", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    from optuna.trial import TrialState
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            time.sleep(0.3)
            if proc.poll() is not None:
                pytest.fail(f"the search ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            if not (out / "study.db").exists():
                continue
            try:
                ts = _trials(out)
            except Exception:           # the study is being created
                continue
            if sum(t.state == TrialState.COMPLETE for t in ts) >= 2 and \
                    any(t.state == TrialState.RUNNING and "params" in t.user_attrs for t in ts):
                break
        else:
            pytest.fail("no trial was running after two finished")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = {t.number: t.datetime_complete for t in _trials(out) if t.state == TrialState.COMPLETE}
    killed = [t.number for t in _trials(out) if t.state == TrialState.RUNNING]
    assert len(killed) == 1 and len(before) >= 2
    assert main(args) == 0
    after = _trials(out)
    assert {t.number: t.datetime_complete for t in after if t.number in before} == before   # not rerun
    stale = [t for t in after if t.user_attrs.get("stale")]
    assert [t.number for t in stale] == killed
    retry = [t for t in after if t.user_attrs.get("retry_of") == killed[0]]
    assert len(retry) == 1
    assert retry[0].params == stale[0].params
    assert _sequence(out) == _sequence(uninterrupted)
    assert json.loads((out / "search.json").read_text())["best"]["params"] == \
        json.loads((uninterrupted / "search.json").read_text())["best"]["params"]


def test_two_workers_share_one_sqlite_study_and_run_no_trial_twice(src, calib, tmp_path):
    out = tmp_path / "w"
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    assert main(_args(src, out, calib, "--trials", "6", "--workers", "2", "--storage", storage)) == 0
    import optuna
    from optuna.trial import TrialState
    ts = optuna.load_study(study_name="slimlm-search", storage=storage).get_trials()
    assert not (out / "study.db").exists()                # the trials went to the given storage
    assert 6 <= len(ts) <= 7                                # a last ask may race the other worker's
    assert all(t.state == TrialState.COMPLETE for t in ts)
    assert {t.user_attrs["worker"] for t in ts} == {0, 1}   # both took trials from the one study
    ran = [t for t in ts if "same_as" not in t.user_attrs]
    assert len({json.dumps(t.user_attrs["params"], sort_keys=True) for t in ran}) == len(ran)  # none run twice
    assert len({t.user_attrs["report"] for t in ran}) == len(ran)
    for t in ts:
        if "same_as" in t.user_attrs:
            assert t.user_attrs["kld"] == next(x for x in ts if x.number == t.user_attrs["same_as"]).user_attrs["kld"]


def _ask_together(url: str, lock: bool) -> list[int]:
    """Two workers (threads, each with its own connection) ask the study at the same moment; their trial numbers."""
    import contextlib
    import threading

    import optuna

    from slimlm.search import ask_lock
    studies = [optuna.load_study(study_name="s", storage=optuna.storages.RDBStorage(url)) for _ in range(2)]
    got, start = [], threading.Barrier(2)

    def ask(study):
        start.wait()
        with ask_lock(url) if lock else contextlib.nullcontext():
            got.append(study.ask().number)
    threads = [threading.Thread(target=ask, args=(s,)) for s in studies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def test_workers_asking_an_sqlite_study_at_once_never_get_the_same_queued_trial(tmp_path):
    """SQLite ignores Optuna's SELECT ... FOR UPDATE: without search.ask_lock two workers popping the queued trial
    at once both got it (~half the tries here); with it, never."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def fresh(i: int) -> str:
        url = f"sqlite:///{tmp_path / f'race{i}.db'}"
        optuna.create_study(study_name="s", storage=url).enqueue_trial({"x": 1.0})
        return url
    unlocked = next((i for i in range(30) if len(set(_ask_together(fresh(i), False))) < 2), None)
    assert unlocked is not None                     # the race is real on this machine: the test means something
    for i in range(10):
        assert sorted(_ask_together(fresh(100 + i), True)) == [0, 1]


def test_search_refuses_bad_settings_before_any_work(src, calib, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(_args(src, out, calib, "--trials", "1", "--methods", "gptq,magic")) == 2
    assert "--methods" in capsys.readouterr().err and not out.exists()
    assert main(_args(src, out, calib, "--trials", "0")) == 2
    assert main(_args(src, out, calib, "--trials", "1", "--storage", "notadb://x")) == 2
    assert "--storage" in capsys.readouterr().err
    with pytest.raises(SystemExit):                     # two targets: argparse refuses
        main(["search", "-o", str(out), "--max-kld", "0.1", "--target-size", "5MB"])
    from slimlm.search import SearchConfig
    with pytest.raises(ConfigError, match="exactly one target"):
        SearchConfig()
    with pytest.raises(ConfigError, match="--budget"):
        SearchConfig(max_kld=0.1, budget="500k")


def test_resuming_with_other_settings_is_refused(uninterrupted, src, calib, capsys):
    args = _args(src, uninterrupted, calib, "--trials", "5")
    args[args.index("0.05")] = "0.07"                         # another --max-kld, same folder
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "max_kld" in err


def test_report_command_draws_frontiers_types_and_a_self_contained_page(src, calib, tmp_path):
    a = tmp_path / "a.gguf"
    assert main(["-q", "compress", str(src), "-o", str(a), "--type", "Q4_0", "--calib", str(calib), "--text",
                 str(calib), "--calib-chunks", "2", "--ctx", "64", "--chunks", "4", "--compare"]) == 0
    ev = tmp_path / "ev.json"
    assert main(["-q", "eval", str(a.with_name("a.llama-cpp.gguf")), "--ref", str(src), "--text", str(calib),
                 "--ctx", "64", "--chunks", "4", "--json", str(ev)]) == 0
    d = tmp_path / "rep"
    assert main(["report", str(a.with_suffix(".report.json")), str(ev), "-o", str(d)]) == 0
    md = (d / "report.md").read_text()
    assert "llama.cpp Q4_0" in md and "| a |" in md and "| ev |" in md
    html = (d / "report.html").read_text()
    assert "<script" not in html and "http" not in html and html.count("data:image/png;base64,") == 3
    assert {p.name for p in d.glob("*.png")} == {"size-kld.png", "speed-kld.png", "types-0.png"}


def test_plots_have_labelled_axes(monkeypatch, tmp_path):
    """Every plot the reports embed has both axes labelled and something drawn."""
    from slimlm import visual
    figs = []
    monkeypatch.setattr(visual, "_save", lambda fig, out: figs.append(fig) or out)
    pts = [{"label": f"t{i}", "group": g, "file_bytes": 2**20 * (5 + i), "kld": 0.1 / (i + 1), "gen_tps": 50 - i,
            "type": "Q4_0"} for i, g in enumerate(["slimlm", "slimlm", "llama.cpp", "unhealed"])]
    visual.plot_frontier(pts, tmp_path / "a.png", chosen=pts[1])
    visual.plot_frontier(pts, tmp_path / "b.png", x="gen_tps")
    visual.plot_widths({"original": {"ffn": [96, 96], "heads": [4, 4]}, "pruned": {"ffn": [64, 32], "heads": [4, 2]}},
                       tmp_path / "c.png")
    visual.plot_type_map([{"name": "blk.0.ffn_up.weight", "shape": [64, 96], "type": "Q4_0", "nbytes": 3456},
                          {"name": "token_embd.weight", "shape": [64, 100], "type": "Q8_0", "nbytes": 6800},
                          {"name": "blk.0.attn_norm.weight", "shape": [64], "type": "F32", "nbytes": 256}],
                         tmp_path / "d.png")
    assert len(figs) == 4
    for fig in figs:
        for ax in [a for a in fig.axes if a.get_label() != "<colorbar>"]:
            assert ax.get_xlabel() and ax.get_ylabel()
            assert ax.collections or ax.lines or ax.images


def test_pareto_keeps_exactly_the_undominated_points():
    from slimlm.visual import pareto
    pts = [{"file_bytes": b, "kld": k, "gen_tps": s} for b, k, s in
           [(10, 0.5, 1), (12, 0.3, 1), (12, 0.4, 1), (15, 0.3, 1), (20, 0.1, 1), (20, 0.1, 2)]]
    assert [(p["file_bytes"], p["kld"]) for p in pareto(pts)] == [(10, 0.5), (12, 0.3), (20, 0.1), (20, 0.1)]
    three = pareto(pts, (("file_bytes", 1), ("kld", 1), ("gen_tps", -1)))
    assert [(p["file_bytes"], p["kld"], p["gen_tps"]) for p in three] == [(10, 0.5, 1), (12, 0.3, 1), (20, 0.1, 2)]


def test_report_refuses_what_is_not_a_report(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    assert main(["report", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "not a slimlm report" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.json"), "-o", str(tmp_path / "o")]) == 2


def test_spearman_matches_the_rank_correlation_with_ties():
    from slimlm.search import spearman
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their mean rank: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_unhealed_candidates_whose_pruned_model_is_already_worse_are_ruled_out_before_quantization(
        tiny_hf, calib, tmp_path):
    """The first trial (no pruning) sets the bar; a later pruned, unhealed candidate whose pruned model alone
    (or with the budget's Fisher prediction added) is RULE_OUT x worse on calibration text is stopped (PRUNED,
    no file), and the report gives each proxy's Spearman over the measured files."""
    from optuna.trial import TrialState

    from slimlm.search import RULE_OUT
    model = tiny_hf("LlamaForCausalLM", intermediate_size=512, num_hidden_layers=4)
    out = tmp_path / "p"
    assert main(["-q", "search", str(model), "-o", str(out), "--target-size", "7.5MB", "--max-prune", "0.05",
                 "--methods", "rtn,gptq", "--calib", str(calib), "--text", str(calib), "--calib-chunks", "2",
                 "--ctx", "64", "--chunks", "4", "--no-speed", "--baselines", "none", "--trials", "5"]) == 0
    ts = _trials(out)
    best = min(t.user_attrs["kld"] for t in ts if t.state == TrialState.COMPLETE)
    ruled = [t for t in ts if t.state == TrialState.PRUNED and "same_as" not in t.user_attrs]
    assert ruled, [(t.state, t.user_attrs.get("params")) for t in ts]
    for t in ruled:
        pr = t.user_attrs["proxies"]                  # stopped after pruning, or once the budget predicted
        assert t.user_attrs["params"]["prune"] > 0 and max(pr["pruned_kld"], pr.get("predicted", 0)) > RULE_OUT * best
        assert not (out / "trials" / f"t{t.number:04d}.gguf").exists()
    s = json.loads((out / "search.json").read_text())
    assert s["trials"]["ruled out by the proxy"] == len(ruled)
    assert s["proxy_spearman"]["fisher_kld"]["n"] == sum(t.state == TrialState.COMPLETE and "same_as" not in
                                                         t.user_attrs for t in ts)
    assert "Spearman" in (out / "report.md").read_text()


def test_prune_ffn_multiple_is_validated_and_rounds_only_the_mlp_widths():
    from slimlm.compress import CompressConfig
    from slimlm.prune.command import PruneConfig, round_multiple
    assert round_multiple(PruneConfig(ratio=0.2, method="mlp+layers", ffn_multiple=256)) == 256
    assert CompressConfig(prune=0.2, prune_ffn_multiple=256, target_size="5MB").prune_config().ffn_multiple == 256
    for bad in (dict(ffn_multiple=100), dict(ffn_multiple=0)):
        with pytest.raises(ConfigError, match="multiple of 32"):
            PruneConfig(ratio=0.2, method="mlp", **bad)
    with pytest.raises(ConfigError, match="--ffn-multiple"):
        PruneConfig(ratio=0.2, method="width", ffn_multiple=256)
    with pytest.raises(ConfigError, match="--ffn-multiple"):
        PruneConfig(ratio=0.2, method="mlp", ffn_multiple=256, format_aware=True)


def test_compress_prune_ffn_multiple_writes_mlp_widths_in_k_quant_rows(tiny_hf, calib, tmp_path):
    from slimlm.visual import gguf_layer_widths
    model = tiny_hf("LlamaForCausalLM", intermediate_size=512, num_hidden_layers=4)
    out = tmp_path / "p.gguf"
    assert main(["-q", "compress", str(model), "-o", str(out), "--type", "Q8_0", "--prune", "0.02",
                 "--prune-method", "mlp", "--prune-ffn-multiple", "256", "--calib", str(calib), "--calib-chunks",
                 "2", "--ctx", "64", "--no-eval"]) == 0
    w = gguf_layer_widths(out)
    assert w["ffn"] and all(f % 256 == 0 for f in w["ffn"]) and sum(w["ffn"]) < 4 * 512
    assert w["heads"] == [4] * len(w["ffn"])                 # heads and hidden size untouched


def test_compress_prune_hidden_keeps_n_channels_so_that_k_quants_fit(tiny_hf, calib, tmp_path):
    """--prune-hidden 256 on a 320-wide model: every tensor that reads the residual stream gets 256 columns, so
    Q4_K_M's K-quants fit all of them (none fits 320: they would fall back); --prune R counts the channels (R
    below their share: only they go)."""
    import gguf

    from slimlm.compress import CompressConfig
    with pytest.raises(ConfigError, match="--prune R too"):
        CompressConfig(prune_hidden=256)
    with pytest.raises(ConfigError, match="--prune-hidden must be >= 1"):
        CompressConfig(prune=0.1, prune_hidden=0)
    model = tiny_hf("LlamaForCausalLM", hidden_size=320, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    out = tmp_path / "h.gguf"
    assert main(["-q", "compress", str(model), "-o", str(out), "--type", "Q4_K_M", "--prune", "0.05", "--prune-hidden",
                 "256", "--calib", str(calib), "--calib-chunks", "2", "--ctx", "64", "--no-eval"]) == 0
    r = gguf.GGUFReader(out)
    assert int(r.get_field("llama.embedding_length").parts[-1][0]) == 256
    assert int(r.get_field("llama.feed_forward_length").parts[-1][0]) == 512      # only the channels went:
    assert int(r.get_field("llama.block_count").parts[-1][0]) == 2                # no layer for R's layer share
    k_quants = {gguf.GGMLQuantizationType[t] for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")}
    readers = [t for t in r.tensors if len(t.shape) == 2 and int(t.shape[0]) == 256]   # ggml: shape[0] = columns
    assert len(readers) >= 2 * 6 + 1 and all(t.tensor_type in k_quants for t in readers), \
        [(t.name, t.tensor_type.name) for t in readers]


def test_min_speedup_target_measures_speed_against_llama_cpps_preset(src, calib, tmp_path):
    """--min-speedup: llama.cpp's --speed-of preset is made and timed once; each trial's constraint is that
    speed ratio, and the chosen file meets it."""
    out = tmp_path / "s"
    assert main(["-q", "search", str(src), "-o", str(out), "--min-speedup", "0.05", "--max-prune", "0",
                 "--calib", str(calib), "--text", str(calib), "--calib-chunks", "2", "--ctx", "64", "--chunks", "2",
                 "--baselines", "none", "--speed-of", "Q8_0", "--trials", "2"]) == 0
    s = json.loads((out / "search.json").read_text())
    base = [p for p in s["baselines"] if p["type"] == "Q8_0"]
    assert len(base) == 1 and base[0]["gen_tps"] > 0
    best = s["best"]
    assert best["gen_tps"] / base[0]["gen_tps"] >= 0.05
    assert best["kld"] == min(p["kld"] for p in s["all"] if p["feasible"])
    assert "speed-kld.png" in (out / "report.md").read_text()


def test_a_search_that_meets_nothing_says_so_and_exits_1(src, calib, tmp_path, capsys):
    out = tmp_path / "n"
    args = _args(src, out, calib, "--trials", "1")
    args[args.index("0.05")] = "1e-12"
    assert main(args) == 1
    assert "no trial met the target" in capsys.readouterr().err
    assert "No trial met the target" in (out / "report.md").read_text()
    assert not (out / "best.gguf").exists()


def test_report_command_reads_a_search(uninterrupted, tmp_path):
    d = tmp_path / "r"
    assert main(["report", str(uninterrupted / "search.json"), "-o", str(d)]) == 0
    s = json.loads((uninterrupted / "search.json").read_text())
    md = (d / "report.md").read_text()
    assert all(f"search {p['label']}" in md for p in s["all"])
    assert (d / "size-kld.png").stat().st_size > 5000


def test_opening_a_study_while_another_process_creates_its_schema_retries(monkeypatch, tmp_path):
    """Two workers (or a reader) starting on one new sqlite file race to create its tables: the one that loses
    ("table ... already exists") retries instead of ending the search; any other failure is a clear error."""
    import optuna

    from slimlm import search
    calls = []
    real = optuna.storages.RDBStorage

    def racing(url, **kw):
        calls.append(url)
        if len(calls) == 1:
            raise RuntimeError("(sqlite3.OperationalError) table trial_heartbeats already exists")
        return real(url, **kw)
    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(search.time, "sleep", lambda s: None)
    assert search.open_storage(f"sqlite:///{tmp_path / 'study.db'}") is not None and len(calls) == 2
    monkeypatch.setattr(optuna.storages, "RDBStorage", lambda url, **kw: (_ for _ in ()).throw(RuntimeError("no")))
    with pytest.raises(ConfigError, match="cannot open the study database"):
        search.open_storage(f"sqlite:///{tmp_path / 'other.db'}")


def test_qat_candidates_need_their_budget_and_heal_first_after_pruning(tmp_path):
    """--methods gptq+qat needs --qat (and --qat needs that method); a QAT candidate's compress arguments train it
    for --qat, and a pruned one is healed first (for its --heal, or for --qat where that is none)."""
    from slimlm.search import SearchConfig, _qat_params, describe, trial_argv
    with pytest.raises(ConfigError, match="--qat BUDGET"):
        SearchConfig(max_kld=0.1, methods=("gptq", "gptq+qat"))
    with pytest.raises(ConfigError, match="add gptq\\+qat to --methods"):
        SearchConfig(max_kld=0.1, qat="10m")
    with pytest.raises(ConfigError, match="--qat"):
        SearchConfig(max_kld=0.1, methods=("gptq+qat",), qat="ten minutes")
    cfg = SearchConfig(max_kld=0.1, methods=("gptq", "gptq+qat"), qat="15m", heal="6m", data=())
    dense = {"prune": 0.0, "method": "gptq+qat", "bpw": 4.5}
    _qat_params(cfg, dense)
    a = trial_argv(cfg, "m.gguf", dense, tmp_path / "t.gguf")
    assert a[a.index("--heal") + 1] == "15m" and "--qat-budget" not in a and "--prune" not in a
    no_heal = SearchConfig(max_kld=0.1, methods=("gptq+qat",), qat="15m")
    for c, heal, healed_for in ((cfg, "none", "6m"), (cfg, "6m", "6m"), (no_heal, None, "15m")):
        p = {"prune": 0.1, "method": "gptq+qat", "bpw": 4.5} | ({"heal": heal} if heal else {})
        _qat_params(c, p)
        a = trial_argv(c, "m.gguf", p, tmp_path / "t.gguf")
        assert a[a.index("--heal") + 1] == healed_for and a[a.index("--qat-budget") + 1] == "15m"
        assert "gptq+qat 15m" in describe(p)
    p = {"prune": 0.1, "heal": "none", "method": "gptq", "bpw": 4.5}
    _qat_params(cfg, p)
    a = trial_argv(cfg, "m.gguf", p, tmp_path / "t.gguf")
    assert "--heal" not in a and "--qat-budget" not in a and "qat" not in p
    assert "qat" not in SearchConfig(max_kld=0.1).fingerprint(None)      # studies from before --qat still resume


def test_search_runs_a_qat_candidate_and_records_its_training(src, tmp_path):
    """A gptq+qat candidate of the search is compress --method gptq+qat: its report holds the QAT record, and the
    file is measured in llama.cpp like every other candidate."""
    from helpers import word_texts
    texts = {}
    for k, text in zip(("train", "eval"), word_texts(), strict=True):
        texts[k] = tmp_path / f"{k}.txt"
        texts[k].write_text(text)
    out = tmp_path / "q"
    assert main(["-q", "search", str(src), "-o", str(out), "--max-kld", "5", "--max-prune", "0", "--methods",
                 "gptq+qat", "--qat", "1024", "--data", str(texts["train"]), "--calib", str(texts["train"]),
                 "--text", str(texts["eval"]), "--calib-chunks", "2", "--ctx", "64", "--chunks", "4", "--no-speed",
                 "--baselines", "none", "--trials", "1"]) == 0
    s = json.loads((out / "search.json").read_text())
    (t,) = s["all"]
    assert t["params"]["method"] == "gptq+qat" and t["params"]["qat"] == "1024"
    assert "--method gptq+qat" in t["command"] and "--heal 1024" in t["command"]      # the recipe rebuilds it
    rep = json.loads(Path(t["report"]).read_text())
    assert "qat" in [st["step"] for st in rep["steps"]]
    q = rep.get("qat") or rep["healing"]
    assert q["what"] == "QAT" and q["budget"] == "1024" and q["stages"][-1]["detail"]["tokens"] == 1024


def test_compress_prune_with_a_size_budget_keeps_mlp_widths_in_k_quant_rows_by_default():
    """compress --prune R --target-size/--bpw (mlp, mlp+layers): the pruned MLP widths default to multiples of 256
    when the model's are (as slimlm search's trials), so ffn_down can take a K-quant; not without a budget, not
    over an explicit --prune-ffn-multiple, --format-aware or --prune-hidden, not for widths that are not
    multiples of 256 and not for a mixture of experts (whole experts go)."""
    from types import SimpleNamespace

    from slimlm.compress import CompressConfig
    from slimlm.prune.command import k_quant_ffn_multiple

    def model(ffn, **extra):
        return SimpleNamespace(config={"num_hidden_layers": 3, "intermediate_size": ffn, "num_attention_heads": 9,
                                       "num_key_value_heads": 3, **extra})
    smol = model(1536)
    assert CompressConfig(prune=0.1, target_size="64MiB").prune_config(model=smol).ffn_multiple == 256
    assert CompressConfig(prune=0.1, bpw=4.0, prune_method="mlp").prune_config(model=smol).ffn_multiple == 256
    assert CompressConfig(prune=0.1, type="Q4_K_M").prune_config(model=smol).ffn_multiple is None
    assert CompressConfig(prune=0.1, target_size="64MiB", prune_ffn_multiple=64).prune_config(
        model=smol).ffn_multiple == 64
    assert CompressConfig(prune=0.1, target_size="64MiB", format_aware=True).prune_config(
        model=smol).ffn_multiple is None
    assert CompressConfig(prune=0.1, target_size="64MiB", prune_hidden=512).prune_config(
        model=smol).ffn_multiple is None
    assert CompressConfig(prune=0.1, target_size="64MiB", prune_method="width").prune_config(
        model=smol).ffn_multiple is None
    assert CompressConfig(prune=0.1, target_size="64MiB").prune_config(model=model(1408)).ffn_multiple is None
    assert CompressConfig(prune=0.1, target_size="64MiB").prune_config(
        model=model(1536, num_local_experts=8)).ffn_multiple is None
    per_layer = model(1536, slimlm_per_layer={"intermediate_size": [1536, 1280, 768]})
    assert CompressConfig(prune=0.1, target_size="64MiB").prune_config(model=per_layer).ffn_multiple == 256
    assert k_quant_ffn_multiple([1536, 256]) is None and k_quant_ffn_multiple([]) is None   # 256 could not shrink
