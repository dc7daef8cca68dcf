"""`tmerge tune` on tiny models: search space, cost model, budgets, halving, determinism, errors."""

from __future__ import annotations

import copy
import json
import time

from tests.helpers import tiny_vit
from tmerge import MergeConfig, TmergeError, apply, merge_info
from tmerge.cli import main
from tmerge.profiling.tune import Candidate, Entry, TuneConfig, adapter_candidate, pareto_front, parse_duration, search_space, split_images, tune

import pytest
import torch

TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
             "img_size=32,patch_size=8,depth=3,embed_dim=48,num_heads=3,num_classes=10"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def images(n=8, seed=0):
    return (torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)), None, None)


def config(**kw):
    base = dict(runtime="torch", batch=2, max_drift=0.05, threads=1, time_budget_s=120, max_timed=3, first_iters=2)
    return TuneConfig(**{**base, **kw})


def test_parse_duration():
    assert parse_duration("15m") == 900 and parse_duration("90s") == 90 and parse_duration("1h") == 3600
    assert parse_duration("1.5m") == 90 and parse_duration("42") == 42
    for bad in ("abc", "0", "-5m", "5d", ""):
        with pytest.raises(TmergeError):
            parse_duration(bad)


def test_search_space_families_and_dedup():
    model = tiny_vit()
    space = search_space(model, ["tome", "pitome"])
    families = {c.family for c in space}
    assert {"r", "r/inflection=-0.5", "r/inflection=0.5", "keep"} <= families
    assert any(f.startswith("late/skip=") for f in families)
    assert {c.merge.prop_attn for c in space} == {True, False}
    # every candidate merges, none is capped at block 0, and no two give the same per-block r
    seen = set()
    for c in space:
        info = merge_info(apply(copy.deepcopy(model), c.merge))
        assert sum(info["r"]) > 0 and not any(cap["layer"] == 0 for cap in info["capped"])
        key = (c.merge.method, c.merge.prop_attn, tuple(info["r"]))
        assert key not in seen, c.label
        seen.add(key)
    assert {c.merge.prop_attn for c in search_space(model, ["tome"], prop_attn="default")} == {True}
    assert {c.merge.prop_attn for c in search_space(model, ["pitome"], prop_attn="default")} == {False}


def test_search_space_refuses_learned_method_without_adapter():
    with pytest.raises(TmergeError, match="learned method"):
        search_space(tiny_vit(), ["dtem"])


def test_export_flags_build_the_same_model():
    """The printed `tmerge export` flags rebuild exactly the candidate that was measured."""
    from tests.helpers import parse_merge_flags

    model = tiny_vit()
    for c in search_space(model, ["tome", "pitome"])[::7]:
        rebuilt = parse_merge_flags(c.merge.as_flags())
        assert rebuilt == c.merge
        via_cli = apply(copy.deepcopy(model), rebuilt)
        direct = apply(copy.deepcopy(model), c.merge)
        assert merge_info(via_cli)["r"] == merge_info(direct)["r"]
        assert merge_info(via_cli)["prop_attn"] == merge_info(direct)["prop_attn"] == c.merge.prop_attn


def test_split_keeps_every_sample_photo_on_both_sides():
    views = torch.arange(32).float().view(32, 1, 1, 1)  # view i shows photo i mod 8
    cal, held = split_images(views, seed=0, period=8)
    assert sorted(int(v) % 8 for v in cal.flatten()) == sorted(int(v) % 8 for v in held.flatten()) == sorted(
        list(range(8)) * 2)
    cal, held = split_images(torch.arange(9).float().view(9, 1, 1, 1), seed=1)
    assert len(cal) == 5 and len(held) == 4 and not set(cal.flatten().tolist()) & set(held.flatten().tolist())


def test_pareto_front():
    def entry(name, flops, drift):
        e = Entry(Candidate(MergeConfig.of("tome", r=1, prop_attn=True), "r", 1), flops)
        e.drift["calibration"] = drift
        e.name = name
        return e

    es = [entry("a", 0.5, 0.3), entry("b", 0.6, 0.1), entry("c", 0.7, 0.2), entry("d", 0.9, 0.05)]
    assert [e.name for e in pareto_front(es, lambda e: e.flops_ratio)] == ["a", "b", "d"]


def test_tune_max_drift_torch():
    model = tiny_vit()
    result = tune(model, config(), model_name="tiny", images=images())
    assert result["met"] and result["mode"] == "max_drift"
    chosen, ref = result["chosen"], result["reference"]
    assert chosen["drift"]["calibration"] <= 0.05 and chosen["drift"]["held_out"] <= 0.05
    assert chosen["stage"] == "chosen" and chosen["timed_rounds"] > 0
    # the constant-r ToMe reference is timed in the same rounds; the choice is at least as fast
    assert ref is not None and ref["label"].startswith("tome r=") and ref["timed_rounds"] > 0
    last = result["rungs"][-1]["ranking"]
    fastest = next(c for c in result["candidates"] if c["label"] == last[0]["label"])
    # the fastest of the last rung, unless it failed held-out or its lead is inside the timing noise
    # and the chosen one drifts less
    assert chosen["label"] == fastest["label"] or "failed held-out" in fastest["stage"] or (
        chosen["drift"]["held_out"] <= fastest["drift"]["held_out"]
        and chosen["latency_ratio_p50_ci"][0] <= fastest["latency_ratio_p50_ci"][1])
    assert any(row["label"] == ref["label"] for row in last)
    # successive halving: fewer candidates, more rounds per rung
    sizes = [len(r["ranking"]) for r in result["rungs"]]
    assert sizes == sorted(sizes, reverse=True) and result["rungs"][0]["rounds"] == 2
    assert result["export_command"].startswith("tmerge export --method ")


def test_tune_is_deterministic_given_the_seed():
    """Cost model, data split and drift are exact; with one timed candidate the choice is too."""
    runs = [tune(tiny_vit(), config(methods=("pitome",), max_timed=1, seed=3), model_name="tiny",
                 images=images(seed=3)) for _ in range(2)]
    strip = [[(c["label"], c["flops_ratio"], c["drift"]) for c in r["candidates"]] for r in runs]
    assert strip[0] == strip[1]
    assert runs[0]["chosen"]["label"] == runs[1]["chosen"]["label"]
    other = tune(tiny_vit(), config(methods=("pitome",), max_timed=1, seed=4), model_name="tiny", images=images(seed=3))
    assert [c["drift"] for c in other["candidates"]] != [c["drift"] for c in runs[0]["candidates"]]  # other split


def test_tune_latency_budget_torch():
    result = tune(tiny_vit(), config(max_drift=None, latency_ms=1e6, methods=("tome",)), model_name="tiny",
                  images=images())
    assert result["met"] and result["mode"] == "latency_ms"
    timed = [c for c in result["candidates"] if c["timed_rounds"]]
    assert result["chosen"]["drift"]["calibration"] == min(c["drift"]["calibration"] for c in timed
                                                            if c["label"] in [r["label"] for r in result["rungs"][-1]["ranking"]])


def test_budget_nobody_meets():
    result = tune(tiny_vit(), config(max_drift=0.0, methods=("tome",)), model_name="tiny", images=images())
    assert not result["met"] and result["chosen"] is not None
    result = tune(tiny_vit(), config(max_drift=None, latency_ms=1e-6, methods=("tome",)), model_name="tiny",
                  images=images())
    assert not result["met"] and result["chosen"]["p50_ms"] is not None


@pytest.mark.parametrize("budget", [0.5, 6.0])
def test_time_budget_is_respected(budget):
    start = time.monotonic()
    try:
        result = tune(tiny_vit(), config(time_budget_s=budget), model_name="tiny", images=images())
    except TmergeError as e:  # too short to measure anything: said so, not a silent non-answer
        assert "time budget" in str(e) and budget < 1
    else:
        assert result["elapsed_s"] <= budget + 2
    assert time.monotonic() - start <= budget + 3


def test_adapter_candidate(tmp_path):
    from tmerge.models.adapters import save_adapter

    model = tiny_vit()
    trained = apply(copy.deepcopy(model), MergeConfig.of("dtem", r=2, adapter=None))
    with torch.no_grad():  # a (random) change of the learned embedding: it drifts less or more than ToMe
        for lin in trained.tmerge_method.embed:
            lin.weight.add_(torch.randn(lin.weight.shape, generator=torch.Generator().manual_seed(0)))
    path = save_adapter(trained, tmp_path / "dtem.safetensors")
    cand = adapter_candidate(str(path))
    assert cand.merge.method == "dtem" and cand.merge.schedule.per_layer == (2, 2, 2)
    assert cand.merge.adapter == str(path) and "--adapter" in cand.merge.as_flags()
    result = tune(model, config(methods=("tome",), adapters=(str(path),), max_drift=1.0), model_name="tiny",
                  images=images())
    learned = [c for c in result["candidates"] if c["method"] == "dtem"]
    assert len(learned) == 1 and learned[0]["stage"].startswith("dropped: drifts more than ToMe")
    assert result["chosen"]["method"] == "tome"


@pytest.mark.parametrize("ours, kept", [(0.5, True), (1.0, False), (2.0, False)])
def test_an_adapter_stays_only_where_it_drifts_less_than_tome(ours, kept):
    from tmerge.profiling.tune import _drop_learned_worse_than_tome

    dtem = MergeConfig.of("dtem", schedule=(2, 2, 2), prop_attn=True, adapter="a.safetensors")
    learned = Entry(Candidate(dtem, "adapter", 6.0), 0.8, [17, 11])
    tome = Entry(Candidate(MergeConfig.of("tome", r=2, prop_attn=True), "r", 2), 0.8, [17, 11])
    families = {learned.cand.family_key: [learned], tome.cand.family_key: [tome]}
    drift = {"dtem": ours, "tome": 1.0}
    _drop_learned_worse_than_tome(families, lambda e, split: drift[e.cand.merge.method], type("P", (), {"log": print})())
    assert (learned.cand.family_key in families) == kept and tome.cand.family_key in families


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_tune_tiny_onnxruntime_export(tmp_path, capsys):
    """ONNX Runtime end to end (one timed candidate keeps the exports few) and a verified --export."""
    out = tmp_path / "tune"
    onnx = tmp_path / "best.onnx"
    rc = main(["tune", *TINY_ARGS, "--runtime", "onnxruntime", "--batch", "2", "--max-drift", "0.05",
               "--methods", "pitome", "--prop-attn-search", "default", "--max-timed", "1", "--threads", "1",
               "--num-images", "4", "--out-dir", str(out), "--export", str(onnx), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out)
    chosen = result["chosen"]
    assert chosen["timed_rounds"] > 0 and chosen["latency_ratio_p50"] > 0
    assert (out / "pareto.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "tune.json").read_text())["chosen"] == chosen
    manifest = json.loads(onnx.with_name("best.onnx.json").read_text())
    tokens = chosen["tokens"]
    assert manifest["parity"]["verified"] and manifest["method"] == "pitome"
    assert [l["r"] for l in manifest["layers"]] == [a - b for a, b in zip(tokens, tokens[1:])]
    assert result["export"]["path"] == str(onnx)


def test_cli_tune_budget_violated_exits_1(tmp_path, capsys):
    rc = main(["tune", *TINY_ARGS, "--runtime", "torch", "--batch", "2", "--max-drift", "0", "--methods", "tome",
               "--num-images", "4", "--threads", "1", "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "error: no candidate meets the budget; closest: tome" in err
    assert not (tmp_path / "o").exists()  # a failed search writes nothing


@pytest.mark.parametrize("args, message", [
    (["--max-drift", "0.1", "--latency-ms", "5"], "exactly one budget"),
    ([], "exactly one budget"),
    (["--max-drift", "-1"], "--max-drift must be"),
    (["--max-drift", "0.1", "--runtime", "nope"], "unknown runtime"),
    (["--max-drift", "0.1", "--time-budget", "soon"], "--time-budget takes a duration"),
    (["--max-drift", "0.1", "--methods", "dtem"], "learned method"),
    (["--max-drift", "0.1", "--methods", "nope"], "unknown method"),
    (["--max-drift", "0.1", "--batch", "0"], "--batch must be"),
    (["--max-drift", "0.1", "--drift-metric", "nope"], "--drift-metric must be"),
    (["--max-drift", "0.1", "--export", "model.txt"], "should end in .onnx"),
    (["--max-drift", "0.1", "--adapter", "missing.safetensors"], "does not exist"),
])
def test_cli_tune_bad_input(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    rc = main(["tune", *TINY_ARGS, "--runtime", "torch", "--out-dir", "o", *args][:] if "--runtime" not in args
              else ["tune", *TINY_ARGS, "--out-dir", "o", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_tune_out_dir_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    rc = main(["tune", *TINY_ARGS, "--runtime", "torch", "--max-drift", "0.1", "--out-dir", str(target)])
    assert rc == 2 and "is not a folder" in capsys.readouterr().err
