"""What a user must be able to trust: no lost or mismatched files, no silently wrong numbers, one
clear line on every failure (signals included), bounds checked before any work."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.profiling.test_check import synthetic_report
from tmerge import MergeConfig
from tmerge._io import write_files
from tmerge.cli import main
from tmerge.errors import TmergeError
from tmerge.profiling import latency as lat
from tmerge.profiling.check import compare
from tmerge.profiling.report import DRIFT_RANGES, STAT_RANGES, save_report, validate_report

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
TINY_KWARGS = "img_size=32,patch_size=8,depth=3,embed_dim=48,num_heads=3,num_classes=10"
TINY_CLI = ["--model", "vit_tiny_patch16_224", "--model-kwargs", TINY_KWARGS]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------------
# all-or-nothing writes, outputs checked up front


def test_multi_file_write_puts_the_old_set_back_when_a_rename_fails(tmp_path):
    model, manifest = tmp_path / "m.onnx", tmp_path / "m.onnx.json"
    model.write_bytes(b"old model")
    manifest.mkdir()  # the second rename cannot land
    with pytest.raises(TmergeError, match="m.onnx.json"):
        write_files({model: b"new model", manifest: b"{}"})
    assert model.read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]  # no temp or backup left


def test_multi_file_write_removes_new_files_when_a_rename_fails(tmp_path):
    (tmp_path / "b.json").mkdir()
    with pytest.raises(TmergeError):
        write_files({tmp_path / "a.onnx": b"a", tmp_path / "b.json": b"b"})
    assert not (tmp_path / "a.onnx").exists()


def test_export_checks_the_manifest_path_before_any_work(tmp_path, capsys):
    out = tmp_path / "x.onnx"
    out.write_bytes(b"old")
    (tmp_path / "x.onnx.json").mkdir()
    start = time.perf_counter()
    assert main(["export", *TINY_CLI, "--r", "2", "--out", str(out)]) == 2
    assert "x.onnx.json" in one_error_line(capsys.readouterr().err)
    assert time.perf_counter() - start < 20  # refused up front, not after the export
    assert out.read_bytes() == b"old"


@pytest.mark.parametrize("out", ["m.onnx.json", "./m.onnx.json"])
def test_profile_out_is_never_its_input_or_manifest(tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"model")
    (tmp_path / "m.onnx.json").write_text("{}")
    assert main(["profile", "--onnx", str(onnx), "--out", out]) == 2
    assert "would be overwritten" in one_error_line(capsys.readouterr().err)
    assert onnx.read_bytes() == b"model" and (tmp_path / "m.onnx.json").read_text() == "{}"


# ------------------------------------------------------------------------------------------------
# reports: every number typed and in range, on write and on read


FIELDS = [("drift", key) for key in DRIFT_RANGES] + [("merged", key) for key in STAT_RANGES] + [
    ("latency", "ratio_p50"), ("flops", "ratio")]


def _set(report: dict, where: str, key: str, value) -> None:
    if where == "drift":
        report["drift"][key] = value
    elif where == "merged":
        report["latency"][0]["merged"][key] = value
    elif where == "latency":
        report["latency"][0][key] = value
    else:
        report[where][key] = value


@pytest.mark.parametrize("where, key", FIELDS)
def test_check_refuses_nan_in_every_field(tmp_path, capsys, where, key):
    bad = synthetic_report()
    _set(bad, where, key, math.nan)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))  # Python writes bare NaN, as a hand-edited file may hold it
    base = tmp_path / "base.json"
    base.write_text(json.dumps(synthetic_report()))
    assert main(["check", str(path), "--baseline", str(base), "--json"]) == 2
    assert key in one_error_line(capsys.readouterr().err)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("key, value", [("kl_mean", -1.0), ("agreement_top1", 1.5), ("knn_agreement", -0.1),
                                        ("cosine_distance_mean", -0.01), ("max_abs_diff", -1.0),
                                        ("cosine_min", 1.5)])
def test_out_of_range_drift_is_refused(key, value):
    report = synthetic_report()
    report["drift"][key] = value
    with pytest.raises(TmergeError, match=key):
        validate_report(report)


def test_nan_std_is_refused_not_a_hidden_warning():
    report = synthetic_report()
    report["latency"][0]["merged"]["std_ms"] = math.nan
    with pytest.raises(TmergeError, match="std_ms"):
        validate_report(report)


def test_update_baseline_with_a_nan_report_is_one_error_line(tmp_path, capsys):
    bad = synthetic_report()
    bad["drift"]["cosine_distance_mean"] = math.nan
    path = tmp_path / "r.json"
    path.write_text(json.dumps(bad))
    assert main(["check", str(path), "--baseline", str(tmp_path / "base.json"), "--update-baseline"]) == 2
    one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "base.json").exists()


def test_save_report_never_writes_invalid_json(tmp_path):
    report = synthetic_report()
    report["drift"]["kl_mean"] = math.inf
    with pytest.raises(TmergeError):
        save_report(report, tmp_path / "r.json")
    assert not list(tmp_path.iterdir())


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6), st.none(),
                    st.booleans(), st.text(max_size=3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(numbers, min_size=len(FIELDS), max_size=len(FIELDS)))
def test_check_with_random_numbers_in_every_field(tmp_path, capsys, values):
    report = synthetic_report()
    for (where, key), value in zip(FIELDS, values):
        _set(report, where, key, value)
    path, base = tmp_path / "r.json", tmp_path / "base.json"
    path.write_text(json.dumps(report))
    base.write_text(json.dumps(synthetic_report()))
    capsys.readouterr()
    rc = main(["check", str(path), "--baseline", str(base), "--json"])
    captured = capsys.readouterr()
    try:
        validate_report(copy.deepcopy(report))
        valid = True
    except TmergeError:
        valid = False
    if valid:
        assert rc in (0, 1), captured.err
        json.loads(captured.out, parse_constant=lambda c: pytest.fail(f"bare {c} in --json output"))
    else:
        assert rc == 2 and captured.out == ""
        one_error_line(captured.err)


# ------------------------------------------------------------------------------------------------
# timing that says when it cannot be trusted


def test_ratio_interval_covers_the_ratio_and_flags_noise():
    rng = np.random.default_rng(0)
    quiet_m, quiet_u = 0.6 + rng.normal(0, 0.002, 50), 1.0 + rng.normal(0, 0.002, 50)
    low, high = lat.ratio_interval(list(quiet_m), list(quiet_u))
    assert low < 0.6 < high and not lat.interval_too_wide(0.6, [low, high])
    busy_m, busy_u = 0.6 * rng.lognormal(0, 0.8, 20), rng.lognormal(0, 0.8, 20)
    ratio = float(np.median(busy_m) / np.median(busy_u))
    assert lat.interval_too_wide(ratio, lat.ratio_interval(list(busy_m), list(busy_u)))
    assert lat.ratio_interval([0.5], [1.0]) is None


def test_noisy_profile_warns_and_stores_the_interval(capsys):
    entry = {"backend": "torch", "device": "cpu", "batch_size": 8, "ratio_p50": 1.212,
             "ratio_p50_ci": [0.7, 1.9], "ci_level": 0.95}
    (line,) = lat.interval_warnings([entry], [4.0, 3.0, 2.0])
    assert "too wide to call" in line and "load average 4" in line


def test_one_timed_run_has_no_spread():
    stats = lat.summarize([0.01], batch_size=1)
    assert stats["std_ms"] is None


def test_profile_report_records_interval_passive_wait_policy_and_warns(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", "from tmerge.cli import entry; entry()", "profile", *TINY_CLI,
                          "--r", "2", "--iters", "1", "--warmup", "0", "--threads", "1", "--no-drift", "--json"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["env"]["omp_wait_policy"] == "PASSIVE"
    entry = report["latency"][0]
    assert entry["ratio_p50_ci"] is None and entry["merged"]["std_ms"] is None
    assert any(line.startswith("warning: latency torch/cpu/b1") for line in run.stderr.splitlines())


def _with_interval(report: dict, ratio: float, interval: list[float]) -> dict:
    report["latency"][0].update(ratio_p50=ratio, ratio_p50_ci=interval)
    return report


def test_check_gates_on_the_interval_not_the_point():
    base = synthetic_report()  # torch ratio 0.6, limit 0.66 at 10 %
    straddles = compare(_with_interval(synthetic_report(), 0.70, [0.58, 0.85]), base)
    assert straddles.passed and straddles.rows[0].status == "uncertain"
    assert any("too noisy to call" in w for w in straddles.warnings)
    above = compare(_with_interval(synthetic_report(), 0.75, [0.70, 0.80]), base)
    assert not above.passed and above.rows[0].status == "REGRESSION"
    inside = compare(_with_interval(synthetic_report(), 0.61, [0.59, 0.63]), base)
    assert inside.passed and inside.rows[0].status == "ok"


def test_tune_prefers_less_drift_when_the_speed_gain_is_noise():
    from tmerge.profiling.tune import Candidate, Entry, TuneConfig, _least_drift_among_ties

    rng = np.random.default_rng(1)
    unmerged = list(1.0 + rng.normal(0, 0.05, 16))

    def entry(label, ratio, held_out):
        e = Entry(Candidate(MergeConfig.of("tome", r=int(label), prop_attn=True), "r", 1.0), flops_ratio=ratio)
        e.times = [u * ratio * (1 + rng.normal(0, 0.05)) for u in unmerged]
        e.reference_times = list(unmerged)
        e.drift = {"calibration": held_out, "held_out": held_out}
        return e

    fast_but_drifty, steady = entry(16, 0.631, 0.00533), entry(15, 0.636, 0.00395)
    clearly_slower = entry(8, 0.85, 0.001)
    config = TuneConfig(runtime="torch", batch=2, max_drift=0.01)
    ranked = [fast_but_drifty, steady, clearly_slower]
    chosen = _least_drift_among_ties(fast_but_drifty, ranked, lambda e, split: e.drift[split], "max_drift", config)
    assert chosen is steady


# ------------------------------------------------------------------------------------------------
# images keep their meaning


PIL = pytest.importorskip("PIL.Image")


@pytest.mark.parametrize("mode, pixels, expected", [
    ("I;16", np.full((8, 8), 32768, np.uint16), 128),
    ("I", np.full((8, 8), 65535, np.int32), 255),
    ("F", np.full((8, 8), 0.5, np.float32), 128),
])
def test_high_bit_depth_greyscale_is_rescaled(tmp_path, mode, pixels, expected):
    from tmerge.data import open_image, to_rgb

    image = PIL.fromarray(pixels, mode=mode) if mode != "I;16" else PIL.fromarray(pixels)
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (8, 8, 3) and abs(int(rgb.mean()) - expected) <= 1
    if mode == "I;16":
        path = tmp_path / "sixteen.png"
        image.save(path)
        assert abs(int(np.asarray(open_image(path)).mean()) - expected) <= 1


@settings(max_examples=40, deadline=None)
@given(mode=st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F"]),
       level=st.floats(0, 1))
def test_every_image_mode_gives_rgb_of_the_same_brightness_or_a_clear_error(mode, level):
    from tmerge.data import to_rgb

    grey = PIL.new("L", (4, 4), int(round(level * 255)))
    if mode in ("I;16", "I"):
        image = PIL.fromarray(np.full((4, 4), round(level * 65535), np.uint16 if mode == "I;16" else np.int32))
    elif mode == "F":
        image = PIL.fromarray(np.full((4, 4), level, np.float32), mode="F")
    else:
        image = grey.convert(mode)
    rgb = np.asarray(to_rgb(image), dtype=np.float64)
    assert rgb.shape == (4, 4, 3)
    if mode not in ("1", "P"):  # 1-bit and palette quantise
        assert abs(rgb.mean() - level * 255) <= 3


def test_unusable_images_are_refused(tmp_path):
    from tmerge.data import to_rgb

    with pytest.raises(TmergeError, match="outside"):
        to_rgb(PIL.fromarray(np.full((4, 4), 2.0, np.float32), mode="F"))
    with pytest.raises(TmergeError, match="outside"):
        to_rgb(PIL.fromarray(np.full((4, 4), 70000, np.int32), mode="I"))


def test_visualize_reads_a_16_bit_png_as_it_looks(tmp_path):
    from tmerge.data import open_image

    path = tmp_path / "dark.png"
    PIL.fromarray(np.full((16, 16), 8000, np.uint16)).save(path)
    assert np.asarray(open_image(path)).mean() < 40  # PIL's convert("RGB") made it 255


# ------------------------------------------------------------------------------------------------
# signals


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"), OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    (tmp_path / "tmp").mkdir()
    return subprocess.Popen([sys.executable, "-m", "tmerge", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _left_in(tmp: Path) -> list[str]:
    # ".ses": ONNX Runtime's own session-id file, kept in the temp folder on purpose (not tmerge's)
    return [p.name for p in tmp.iterdir() if p.name != ".ses"]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never reached the waited-for state: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_print_one_line_and_remove_what_the_command_created(tmp_path, sig, code):
    onnx_dir = tmp_path / "kept"
    proc = _start(["profile", *TINY_CLI, "--r", "2", "--backends", "onnxruntime", "--onnx-dir", str(onnx_dir),
                   "--iters", "100000", "--warmup", "0", "--no-drift"], tmp_path)
    _wait_for(lambda: (onnx_dir / "unmerged.onnx").exists(), proc)  # both exports done: timing runs now
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code
    assert err.strip().splitlines()[-1] == "error: interrupted" and err.count("error:") == 1
    assert not onnx_dir.exists()
    assert not _left_in(tmp_path / "tmp")


def test_sigterm_removes_the_profile_temp_folder(tmp_path):
    proc = _start(["profile", *TINY_CLI, "--r", "2", "--backends", "onnxruntime", "--iters", "100000",
                   "--warmup", "0", "--no-drift"], tmp_path)
    _wait_for(lambda: any(p.name.startswith("tmerge-profile-") and (p / "unmerged.onnx").exists()
                          for p in (tmp_path / "tmp").iterdir()), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "error: interrupted"
    assert not _left_in(tmp_path / "tmp")


# ------------------------------------------------------------------------------------------------
# bounds up front, contract messages


def test_repeated_batch_sizes_are_refused_before_any_work(capsys):
    start = time.perf_counter()
    assert main(["profile", *TINY_CLI, "--r", "2", "--batch-sizes", "1,1", "--no-drift"]) == 2
    assert "repeats" in one_error_line(capsys.readouterr().err)
    assert time.perf_counter() - start < 10


def test_huge_heldout_is_refused_at_once(tmp_path, capsys):
    start = time.perf_counter()
    assert main(["train", *TINY_CLI, "--method", "dtem", "--r", "2", "--heldout", "100000",
                 "--out", str(tmp_path / "a.safetensors")]) == 2
    assert "at most" in one_error_line(capsys.readouterr().err)
    assert time.perf_counter() - start < 30


def test_train_batch_larger_than_the_data_is_refused(tmp_path, capsys):
    assert main(["train", *TINY_CLI, "--method", "dtem", "--r", "2", "--num-images", "8", "--heldout", "0",
                 "--batch-size", "10000000", "--out", str(tmp_path / "a.safetensors")]) == 2
    assert "--batch-size 10000000" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "a.safetensors").exists()


@pytest.mark.parametrize("args, names", [
    (["check", "{tmp}/r.json", "--baseline", "{tmp}/nope.json"], "--baseline"),
    (["export", *TINY_CLI, "--r", "2", "--batch-size", "0", "--out", "{tmp}/m.onnx"], "--batch-size"),
    (["export", *TINY_CLI, "--r", "2", "--out", ""], "--out is empty"),
    (["tune", *TINY_CLI, "--max-drift", "0.1", "--export", "{tmp}/x.txt"], "--export"),
])
def test_messages_name_the_option_at_fault(tmp_path, capsys, args, names):
    save_report(synthetic_report(), tmp_path / "r.json")
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    assert names in one_error_line(capsys.readouterr().err)


def test_non_pickle_checkpoint_gets_no_advice_to_disable_weights_only(tmp_path, capsys):
    bad = tmp_path / "c.pth"
    bad.write_bytes(b"not a pickle at all")
    assert main(["schedule", *TINY_CLI, "--r", "2", "--checkpoint", str(bad)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "weights_only=False" not in line and "c.pth" in line


def test_image_size_must_be_a_multiple_of_the_patch_size(capsys):
    assert main(["schedule", "--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=31,patch_size=8",
                 "--r", "2"]) == 2
    assert "multiple" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", ["sweep", "tune"])
def test_sweep_and_tune_check_their_files_before_any_work(tmp_path, capsys, command):
    (tmp_path / "pareto.png").mkdir()
    args = (["sweep", *TINY_CLI, "--methods", "tome", "--r", "2"] if command == "sweep" else
            ["tune", *TINY_CLI, "--max-drift", "0.1", "--runtime", "torch"])
    start = time.perf_counter()
    assert main([*args, "--out-dir", str(tmp_path)]) == 2
    assert "pareto.png" in one_error_line(capsys.readouterr().err)
    assert time.perf_counter() - start < 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto.png"]


def test_image_preparation_reports_progress():
    from tests.helpers import tiny_vit
    from tmerge.data import load_images

    seen = []
    load_images("samples", tiny_vit(), n=130, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(64, 130), (128, 130), (130, 130)]
