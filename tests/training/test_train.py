"""Training learned merges: loss goes down, determinism, resume, adapters, errors, CLI, DDP."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import tmerge
from tests.helpers import tiny_vit
from tmerge import MergeConfig, ModelSpec
from tmerge.models.adapters import load_adapter, read_adapter, save_adapter
from tmerge.models.forward import forward_with_features
from tmerge.training import distill_loss, train_adapter

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)


def _train(model, out, data, method="dtem", r=3, options=None, **kw):
    images, held = data
    args = dict(images=images, heldout=held, out=out, steps=8, batch_size=8, lr=1e-2, progress=False,
                eval_every=4, checkpoint_every=4, seed=0)
    args.update(kw)
    return train_adapter(model, MergeConfig.of(method, r=r, **(options or {})), **args)


def _soft_loss(model, teacher, images, headless):
    """The training objective on all images (method in training mode)."""
    with torch.no_grad():
        target = forward_with_features(teacher, images)[0]
        model.tmerge_method.train()
        out = forward_with_features(model, images)[0]
        model.tmerge_method.eval()
    return float(distill_loss(out, target, headless))


@pytest.mark.parametrize("method,kwargs", [("dtem", {}), ("dtem", {"num_classes": 0}),
                                           ("ltm", {"num_classes": 0, "global_pool": "avg"})])
def test_training_reduces_the_loss(method, kwargs, data, tmp_path):
    base = tiny_vit("plain", **kwargs)
    headless = base.num_classes == 0
    # DTEM's relaxation: a smooth objective (its default straight-through forward is piecewise constant)
    options = {"relaxed": 1} if method == "dtem" else {}
    before = tmerge.apply(copy.deepcopy(base), MergeConfig.of(method, adapter=None, r=3, **options))
    loss_before = _soft_loss(before, base, data[0], headless)
    model = copy.deepcopy(base)
    # full-batch steps: gradient descent on exactly the objective measured here
    summary = _train(model, tmp_path / "a.safetensors", data, method, steps=6, lr=5e-3, batch_size=32,
                     options=options)
    loss_after = _soft_loss(model, base, data[0], headless)
    if method == "ltm":  # a gate the gradient pushes below 0 stays clamped there: ToMe's loss, not worse
        assert loss_after <= loss_before
        assert any(not torch.equal(a, b) for a, b in zip(model.tmerge_method.state_dict().values(),
                                                         before.tmerge_method.state_dict().values()))
    else:
        assert loss_after < loss_before
    assert summary["steps"] == 6 and len(summary["loss_history"]) == 6
    assert summary["heldout_drift"]["n"] == 8 and summary["drift_history"][0]["step"] == 0
    assert summary["loss"] == ("cosine_features" if headless else "kl_logits")
    assert not model.tmerge_method.training  # ends in inference mode, merged


def test_same_seed_same_adapter_and_resume(data, tmp_path):
    base = tiny_vit("plain")
    _train(copy.deepcopy(base), tmp_path / "full.safetensors", data)
    full, meta = read_adapter(tmp_path / "full.safetensors")
    _train(copy.deepcopy(base), tmp_path / "again.safetensors", data)
    again, _ = read_adapter(tmp_path / "again.safetensors")
    assert all(torch.equal(full[k], again[k]) for k in full)

    class Stop(Exception):
        pass

    def interrupt(step, _loss):
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        _train(copy.deepcopy(base), tmp_path / "cut.safetensors", data, on_step=interrupt)
    assert (tmp_path / "cut.safetensors.ckpt.pt").is_file() and not (tmp_path / "cut.safetensors").exists()
    # a checkpoint of another run is refused
    with pytest.raises(tmerge.TmergeError, match="different run"):
        _train(copy.deepcopy(base), tmp_path / "cut.safetensors", data, resume=True, lr=5e-3, steps=9)
    summary = _train(copy.deepcopy(base), tmp_path / "cut.safetensors", data, resume=True)
    resumed, _ = read_adapter(tmp_path / "cut.safetensors")
    assert summary["steps"] == 8
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # once the adapter is written the checkpoint (3x its size) is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.safetensors", "cut.safetensors", "full.safetensors"]
    assert meta["method"] == "dtem" and meta["r"] == [3, 3, 3] and meta["steps"] == 8
    assert meta["data"] == {"n_images": 32} and "final_loss" in meta and meta["weights_sha256"]


def test_adapter_round_trip_and_mismatches(data, tmp_path):
    base = tiny_vit("plain")
    trained = copy.deepcopy(base)
    path = tmp_path / "ltm.safetensors"
    _train(trained, path, data, "ltm", steps=4)
    fresh = tmerge.apply(copy.deepcopy(base), MergeConfig.of("ltm", adapter=None, r=3))
    meta = load_adapter(fresh, path)
    assert meta["method"] == "ltm"
    x = data[1]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)
    for k, v in trained.tmerge_method.state_dict().items():
        assert torch.equal(fresh.tmerge_method.state_dict()[k], v)

    cases = [
        (tmerge.apply(copy.deepcopy(base), MergeConfig.of("dtem", adapter=None, r=3)), "trained for method 'ltm'"),
        (tmerge.apply(copy.deepcopy(base), MergeConfig.of("ltm", adapter=None, r=2)), "schedule"),
        (tmerge.apply(copy.deepcopy(base), MergeConfig.of("ltm", adapter=None, r=3, prop_attn=False)), "proportional attention"),
        (tmerge.apply(tiny_vit("plain", seed=1), MergeConfig.of("ltm", adapter=None, r=3)), "weights"),
        (tmerge.apply(copy.deepcopy(base), MergeConfig.of("ltm", adapter=None, r=3, topk=2)), "options"),
        (tmerge.apply(copy.deepcopy(base), MergeConfig.of("ltm", adapter=None, r=3, mask_dim=8)), "options"),
        (copy.deepcopy(base), "needs a merged model"),
    ]
    for model, message in cases:
        with pytest.raises(tmerge.TmergeError, match=message):
            load_adapter(model, path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    fresh = tmerge.apply(copy.deepcopy(base), MergeConfig.of("ltm", adapter=None, r=3))
    with pytest.raises(tmerge.TmergeError, match="could not be read"):
        load_adapter(fresh, bad)
    with pytest.raises(tmerge.TmergeError, match="does not exist"):
        load_adapter(fresh, tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(tmerge.TmergeError, match="not a tmerge adapter"):
        load_adapter(fresh, tmp_path / "other.safetensors")
    with pytest.raises(tmerge.TmergeError, match="no learned parameters"):
        save_adapter(tmerge.apply(copy.deepcopy(base), MergeConfig.of("tome", r=3)), tmp_path / "tome.safetensors")


def test_training_errors(data, tmp_path):
    base = tiny_vit("plain")
    out = tmp_path / "x.safetensors"
    with pytest.raises(tmerge.TmergeError, match="only learned methods"):
        _train(copy.deepcopy(base), out, data, "tome")
    with pytest.raises(tmerge.TmergeError, match="merges no tokens"):
        _train(copy.deepcopy(base), out, data, r=0)
    with pytest.raises(tmerge.TmergeError, match="not both"):
        _train(copy.deepcopy(base), out, data, epochs=1)
    with pytest.raises(tmerge.TmergeError, match="--lr must be a finite number > 0"):
        _train(copy.deepcopy(base), out, data, lr=0.0)


def test_cli_train_then_load(tmp_path, monkeypatch, capsys):
    import tmerge.models
    import tmerge.models.spec
    from tmerge.cli import main

    from PIL import Image

    for module in (tmerge.models, tmerge.models.spec):  # every module that bound the name
        monkeypatch.setattr(module, "load_model", lambda name=None, **kw: tiny_vit("plain"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        pixels = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "cli.safetensors"
    args = ["train", "--method", "dtem", "--r", "2", "--data", str(folder), "--heldout", "4", "--steps", "3",
            "--batch-size", "4", "--out", str(out), "--no-progress", "--json", "--seed", "1"]
    assert main(args) == 0
    summary = __import__("json").loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["data"]["n_images"] == 8 and out.is_file()
    # --adapter in every command goes through build_merged_model
    from tmerge.models.merged import build_merged_model

    net = build_merged_model(ModelSpec(), MergeConfig.of("dtem", r=2, adapter=str(out)))
    assert net.tmerge_method.adapter["steps"] == 3
    with pytest.raises(tmerge.TmergeError, match="schedule"):
        build_merged_model(ModelSpec(), MergeConfig.of("dtem", r=3, adapter=str(out)))
    assert main(["train", "--method", "tome", "--r", "2", "--data", str(folder), "--steps", "1",
                 "--out", str(tmp_path / "t.safetensors"), "--no-progress"]) == 2
    assert "only learned methods" in capsys.readouterr().err
    assert main(["train", "--method", "dtem", "--r", "2", "--data", str(folder), "--out", "x.pt"]) == 2
    assert main(["train", "--method", "dtem", "--r-range", "2", "--data", str(folder), "--out", "y.safetensors"]) == 2
    assert "--r-range takes LO:HI" in capsys.readouterr().err

    # a shipped adapter for these weights is used when no --adapter is given, and reported
    import tmerge.models.adapters as adapters

    shipped = tmp_path / "shipped"
    shipped.mkdir()  # commands write files into existing folders only
    assert main(["train", "--method", "ltm", "--r-range", "1:2", "--data", str(folder), "--heldout", "0",
                 "--steps", "2", "--batch-size", "4", "--no-progress", "--json",
                 "--out", str(shipped / adapters.shipped_adapter_name("ltm"))]) == 0
    capsys.readouterr()
    monkeypatch.setattr(adapters, "SHIPPED_DIR", shipped)
    net = build_merged_model(ModelSpec(), MergeConfig.from_cli("ltm", r=2))  # no --adapter
    used = tmerge.merge_info(net)["adapter"]
    assert used["path"] == str(shipped / adapters.shipped_adapter_name("ltm")) and used["r_range"] == [1, 2]
    assert tmerge.merge_info(build_merged_model(ModelSpec(), MergeConfig.from_cli("dtem", r=2)))["adapter"] == "untrained"
    # the Python API loads the shipped adapter the same way, and refuses a learned method without one
    default = tmerge.models.load_model(None)
    assert tmerge.merge_info(tmerge.apply(copy.deepcopy(default), MergeConfig.of("ltm", r=2)))["adapter"]["path"] == used["path"]
    with pytest.raises(tmerge.TmergeError, match="ships no adapter"):
        tmerge.apply(copy.deepcopy(default), MergeConfig.of("dtem", r=2))


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, hashlib, torch
    sys.path.insert(0, {root!r})
    import tmerge
    from tests.helpers import tiny_vit
    from tmerge.training import train_adapter
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 32, 32, generator=g)
    model = tiny_vit("plain", num_classes=0)
    summary = train_adapter(model, tmerge.MergeConfig.of("dtem", r=3), images=images, heldout=images[:4], out={out!r}, steps=3,
                            batch_size=4, lr=1e-2, progress=False, checkpoint_every=0, device="cpu")
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in model.tmerge_method.state_dict().values()))
    rank = os.environ["RANK"]
    open({out!r} + ".rank" + rank, "w").write(digest.hexdigest() + " " + str(summary["world_size"]))
""")


def test_ddp_two_cpu_processes(tmp_path):
    out = str(tmp_path / "ddp.safetensors")
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), out=out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(script)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [Path(out + f".rank{r}").read_text().split() for r in (0, 1)]
    assert ranks[0] == ranks[1]  # DDP kept both replicas identical
    assert ranks[0][1] == "2"
    _state, meta = read_adapter(out)
    assert meta["world_size"] == 2 and meta["steps"] == 3


def test_one_adapter_for_a_range_of_r(data, tmp_path):
    """r drawn per step from a range: the adapter loads for any r in it and is refused above it."""
    base = tiny_vit("plain", num_classes=0)
    path = tmp_path / "range.safetensors"
    summary = _train(copy.deepcopy(base), path, data, r=None, r_range=(1, 3), steps=6)
    assert summary["r_range"] == [1, 3]
    assert read_adapter(path)[1]["r_range"] == [1, 3]
    for r in (1, 2, 3):
        model = tmerge.apply(copy.deepcopy(base), MergeConfig.of("dtem", adapter=None, r=r))
        load_adapter(model, path)
        assert tmerge.merge_info(model)["adapter"]["r_range"] == [1, 3]
    with pytest.raises(tmerge.TmergeError, match="r = 1..3"):
        load_adapter(tmerge.apply(copy.deepcopy(base), MergeConfig.of("dtem", adapter=None, r=4)), path)
    with pytest.raises(tmerge.TmergeError, match="r_range or a schedule"):
        _train(copy.deepcopy(base), path, data, r=2, r_range=(1, 3))
    # the same seed draws the same r sequence and gives the same bytes
    again = tmp_path / "again.safetensors"
    _train(copy.deepcopy(base), again, data, r=None, r_range=(1, 3), steps=6)
    assert again.read_bytes() == path.read_bytes()


def test_trainer_only_calls_the_method_hooks():
    """The trainer never looks up method attributes or names: the hooks in the method files."""
    import inspect

    import tmerge.training as training

    source = inspect.getsource(training)
    for needle in ('"ltm"', '"dtem"', ".embed", ".masks", "_ib"):
        assert needle not in source
    assert set(training.trainable_methods()) == {"dtem", "ltm"}



def test_shipped_adapters_match_the_default_model_only():
    from tmerge.models.adapters import (
        SHIPPED_DIR,
        read_adapter,
        shipped_adapter,
        shipped_adapter_name,
    )

    for method in ("dtem", "ltm"):
        path = SHIPPED_DIR / shipped_adapter_name(method)
        assert path.is_file() and path.stat().st_size < 2_000_000
        meta = read_adapter(path)[1]
        assert meta["method"] == method and meta["model"] == "dinov2-s14"
        assert meta["r_range"][0] <= 8 and meta["r_range"][1] >= 16
        tiny = tmerge.apply(tiny_vit("plain"), MergeConfig.of(method, adapter=None, r=2))
        assert shipped_adapter(tiny, method) is None  # other weights: untrained (= ToMe)
        assert tmerge.merge_info(tiny)["adapter"] == "untrained"


def test_resume_needs_a_readable_checkpoint(data, tmp_path):
    base = tiny_vit("plain")
    out = tmp_path / "r.safetensors"
    with pytest.raises(tmerge.TmergeError, match="no checkpoint .* to continue from"):
        _train(copy.deepcopy(base), out, data, resume=True)
    (tmp_path / "r.safetensors.ckpt.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(tmerge.TmergeError, match="cannot be read"):
        _train(copy.deepcopy(base), out, data, resume=True)


@pytest.mark.parametrize("args, message", [
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--ib-weight", "nan"], "--ib-weight must be a finite number >= 0"),
    (["--resume"], "--resume: there is no checkpoint"),
    (["--num-images", "0"], "--num-images must be at least 1"),
])
def test_train_cli_refuses_before_work(tmp_path, capsys, args, message):
    from tmerge.cli import main

    out = tmp_path / "a.safetensors"
    argv = ["train", "--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=8,depth=2",
            "--r", "2", "--out", str(out), "--steps", "1", "--no-progress", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_balanced_r_and_annealed_relaxation(data, tmp_path):
    """Losses divided by ToMe's at each r; an annealed training-only option is back at its configured
    value afterwards, and the adapter loads whatever training-only options the model has."""
    base = tiny_vit("plain", num_classes=0)
    path = tmp_path / "annealed.safetensors"
    summary = _train(copy.deepcopy(base), path, data, r=None, r_range=(1, 3), steps=4, options={"relaxed": 1},
                     anneal={"tau2": (1.0, 0.05)})
    assert summary["balance_r"] and set(summary["tome_reference_loss"]) == {"1", "2", "3"}
    assert summary["training_options"]["tau2"] == 0.1 and summary["training_options"]["relaxed"] == 1
    meta = read_adapter(path)[1]
    assert meta["options"]["tau2"] == 0.1 and meta["anneal"] == {"tau2": [1.0, 0.05]}
    load_adapter(tmerge.apply(copy.deepcopy(base), MergeConfig.of("dtem", adapter=None, r=2)), path)  # relaxed=0 here
    with pytest.raises(tmerge.TmergeError, match="training-only"):
        _train(copy.deepcopy(base), path, data, anneal={"feat_dim": (8, 16)})
    stopped = _train(copy.deepcopy(base), tmp_path / "s.safetensors", data, steps=4, stop_after=2, checkpoint_every=0)
    assert stopped["steps"] == 2 and stopped["planned_steps"] == 4 and stopped["stopped_early"]
    with pytest.raises(tmerge.TmergeError, match="balance_r needs r_range"):
        _train(copy.deepcopy(base), path, data, balance_r=True)


def test_apply_needs_an_adapter_for_a_learned_method(data, tmp_path):
    base = tiny_vit("plain", num_classes=0)
    with pytest.raises(tmerge.TmergeError, match="adapter=None"):
        tmerge.apply(copy.deepcopy(base), MergeConfig.of("dtem", r=2))
    assert tmerge.merge_info(tmerge.apply(copy.deepcopy(base), MergeConfig.of("ltm", r=2, adapter=None)))["adapter"] == "untrained"
    path = tmp_path / "a.safetensors"
    _train(copy.deepcopy(base), path, data, r=2, steps=2)
    model = tmerge.apply(copy.deepcopy(base), MergeConfig.of("dtem", r=2, adapter=path))
    assert tmerge.merge_info(model)["adapter"]["path"] == str(path)
    with pytest.raises(tmerge.TmergeError, match="takes no adapter"):
        tmerge.apply(copy.deepcopy(base), MergeConfig.of("tome", r=2, adapter=path))
