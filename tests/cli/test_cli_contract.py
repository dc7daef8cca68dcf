"""The command-line contract, driven with random argument lists (hypothesis).

Every command gets random picks of its options, each with a valid, invalid, extreme or empty value,
on a tiny random-init model. Whatever the input: the exit code is 0, 1 or 2, nothing escapes as a
traceback, a failure prints exactly one ``error:`` line on stderr, and a failure leaves no new file
in the working folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

from tmerge.cli import main

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TINY_KWARGS = "img_size=32,patch_size=8,depth=2,embed_dim=48,num_heads=3,num_classes=10"
BASE = ["--model", "vit_tiny_patch16_224", "--model-kwargs", TINY_KWARGS]
FLAG = None  # an option that takes no value

MODEL = {
    "--model": ["vit_tiny_patch16_224", "no_such_model", "", "resnet18"],
    "--model-kwargs": [TINY_KWARGS, "", "depth=abc", "img_size=-1", "bogus_kwarg=1", "depth", "depth=1,depth=2"],
    "--checkpoint": ["missing.pth", ".", "garbage.pth", ""],
}
MERGE = {
    "--method": ["tome", "pitome", "dtem", "ltm", "none", "nope", ""],
    "--r": ["0", "2", "1000", "-1", "abc", ""],
    "--schedule": ["2,2", "", "8,,8", "100", "1,2,3,4,5", "2,x"],
    "--keep-ratio": ["0.9", "1.5", "0", "nan", "abc", ""],
    "--inflection": ["0.5", "2", "nan"],
    "--prop-attn": FLAG,
    "--no-prop-attn": FLAG,
    "-o": ["margin=0.9", "margin=abc", "topk=0", "x=1", "=", "margin", "bsm_layers=-3", "alpha=nan"],
    "--adapter": ["missing.safetensors", ".", "garbage.pth"],
}
MEASURE = {
    "--backends": ["torch", "onnxruntime", "tvm", "", "torch,,torch", "tensorrt"],
    "--device": ["cpu", "cuda", "tpu", ""],
    "--batch-sizes": ["1", "2,1", "0", "1,,8", "100000000000", "abc", ""],
    "--warmup": ["0", "1", "-1", "abc"],
    "--iters": ["1", "2", "0", "-5", ""],
    "--threads": ["1", "2", "0", "100000", "-1"],
    "--data": ["samples", "./missing", "fashion-mnist:bogus", "corpus:bogus", "", "imagenet", "."],
    "--num-images": ["2", "0", "-1", "100000000000"],
    "--no-drift": FLAG,
    "--merge-form": ["onehot", "scatter", "scatter_nd", "bogus", ""],
}
OUT_JSON = ["out.json", "nodir/out.json", ".", "out.txt", "", "readonly/out.json", "readonly"]

COMMANDS = {
    "schedule": {**MODEL, **MERGE, "--json": FLAG},
    "profile": {**MODEL, **MERGE, **MEASURE, "--out": OUT_JSON, "--onnx": ["missing.onnx", ".", "garbage.pth"],
                "--onnx-dir": ["onnx", "garbage.pth", "nodir/onnx"], "--json": FLAG},
    "sweep": {**MODEL, **MEASURE, "--methods": ["tome", "none,pitome", "nope", "", "tome,,tome"],
              "--r": ["2", "2,1", "1000", "-1", "", "a"], "--keep-ratios": ["0.9", "1.5", "", "0.9,,0.8"],
              "--out-dir": ["sw", "garbage.pth", "nodir/sw", "readonly"],
              "--drift-metric": ["kl_mean", "nope"], "--json": FLAG},
    "check": {"--baseline": ["report.json", "missing.json", "garbage.pth", ".", "sweep.json", "other.json"],
              "--max-latency-regression": ["10%", "0.05", "10", "abc", "-1%", "", "inf"],
              "--max-flops-regression": ["1%", "5"], "--max-drift": ["10%", "nan"],
              "--update-baseline": FLAG, "--json": FLAG},
    "visualize": {**MODEL, **MERGE, "--image": ["astronaut", "missing.png", ".", "", "garbage.pth"],
                  "--out": ["v.png", "v.jpg", "nodir/v.png", "readonly/v.png"], "--layers": ["0", "5", "", "a", "0,,1"],
                  "--style": ["mean", "random", "bogus"], "--per-layer": FLAG, "--json": FLAG},
    "train": {**MODEL, **{k: MERGE[k] for k in ("--method", "--r", "--schedule", "--keep-ratio", "-o")},
              "--out": ["a.safetensors", "a.pt", "nodir/a.safetensors", "readonly/a.safetensors"],
              "--lr": ["0.01", "nan", "-1", "inf"], "--steps": ["1", "0", "-2"], "--epochs": ["1", "0"],
              "--num-images": ["4", "0", "100000000000"], "--heldout": ["0", "-1", "2", "100000"],
              "--batch-size": ["2", "0"], "--resume": FLAG, "--data": ["samples", "./missing", "."],
              "--json": FLAG},
    "export": {**MODEL, **MERGE, "--out": ["m.onnx", "nodir/m.onnx", ".", "m.txt", "", "readonly/m.onnx"],
               "--ops": ["portable", "plugin", "bogus"], "--batch-size": ["1", "0", "100000000000"],
               "--static-batch": FLAG, "--opset": ["18", "5", "abc"], "--format": ["onnx", "trt", "bogus"],
               "--fp16": FLAG, "--json": FLAG},
}
FOLDER_OUTPUTS = ("sw", "onnx")
# what every command must be given to do real work quickly (tried first, then replaced at random)
DEFAULTS = {
    "schedule": BASE + ["--r", "2"],
    "profile": BASE + ["--r", "2", "--iters", "2", "--warmup", "0", "--num-images", "2"],
    "sweep": BASE + ["--r", "2", "--iters", "1", "--warmup", "0", "--no-drift", "--out-dir", "sw"],
    "check": ["report.json", "--baseline", "report.json"],
    "visualize": BASE + ["--r", "2", "--image", "astronaut", "--out", "v.png"],
    "train": BASE + ["--method", "dtem", "--r", "2", "--steps", "1", "--num-images", "4", "--heldout", "2",
                     "--batch-size", "2", "--no-progress", "--out", "a.safetensors"],
    "export": BASE + ["--r", "2", "--out", "m.onnx"],
}


def argument_lists(command: str):
    options = COMMANDS[command]

    def pick(name):
        values = options[name]
        return st.just([name]) if values is FLAG else st.sampled_from(values).map(lambda v: [name, v])

    chosen = st.lists(st.sampled_from(sorted(options)), min_size=1, max_size=3, unique=True)
    return chosen.flatmap(lambda names: st.tuples(*[pick(n) for n in names])).map(
        lambda pairs: DEFAULTS[command] + [token for pair in pairs for token in pair])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with the inputs the argument lists name: a valid report, garbage, a read-only folder."""
    from tests.profiling.test_gate import synthetic_report

    root = tmp_path_factory.mktemp("contract")
    (root / "report.json").write_text(json.dumps(synthetic_report()))
    other = synthetic_report()
    other["latency"][0]["threads"] = 1
    (root / "other.json").write_text(json.dumps(other))
    (root / "sweep.json").write_text(json.dumps({"kind": "tmerge.sweep", "schema_version": 1}))
    (root / "garbage.pth").write_bytes(b"\x00not a checkpoint")
    (root / "readonly").mkdir()
    os.chmod(root / "readonly", 0o555)
    yield root
    os.chmod(root / "readonly", 0o755)


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"" for p in sorted(root.rglob("*"))}


def run_contract(workdir: Path, argv: list[str]) -> None:
    before = listing(workdir)
    if os.environ.get("TMERGE_CONTRACT_LOG"):  # which argument list is running, when one is slow
        with open(os.environ["TMERGE_CONTRACT_LOG"], "a") as log:
            log.write(" ".join(argv) + "\n")
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)  # an exception escaping here is the traceback a user would see
    finally:
        os.chdir(cwd)
    stderr = err.getvalue()
    assert code in (0, 1, 2), (argv, code, stderr)
    assert "Traceback" not in stderr, (argv, stderr)
    if code != 0:
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, (argv, stderr)
        assert listing(workdir) == before, (argv, "files changed on failure")
    else:  # a success may write its outputs; remove them so each example starts from the same folder
        new_folders = [n for n in set(listing(workdir)) - set(before) if (workdir / n).is_dir()]
        # only folders named as such (--out-dir, --onnx-dir) are created; a file's folder must exist
        assert all(Path(n).parts[0] in FOLDER_OUTPUTS for n in new_folders), (argv, new_folders)
        for name in set(listing(workdir)) - set(before):
            path = workdir / name
            if path.is_file():
                path.unlink()
        for name in sorted(set(listing(workdir)) - set(before), reverse=True):
            (workdir / name).rmdir()


def contract_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("command, examples", [("schedule", 25), ("check", 60), ("visualize", 15), ("profile", 40),
                                               ("sweep", 10), ("train", 12), ("export", 6)])
def test_cli_contract(workdir, command, examples):
    @contract_settings(examples)
    @given(argv=argument_lists(command))
    def check(argv):
        run_contract(workdir, [command, *argv])

    check()
