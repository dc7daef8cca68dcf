"""`tmerge visualize`: patch groups partition the patches, sizes agree with the merge, PNG is valid."""

from __future__ import annotations

from tests.helpers import TINY_VARIANTS, tiny_vit
from tmerge import MergeConfig, apply
from tmerge.cli import main
from tmerge.profiling.visualize import patch_groups, render_groups

import numpy as np
import pytest
import torch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_groups_partition_patches(variant, method):
    model = apply(tiny_vit(variant), MergeConfig.of(method, r=3))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    groups = patch_groups(model, images)
    tokens = model.blocks.last_tokens
    num_prefix = model.num_prefix_tokens
    assert len(groups) == len(model.blocks)
    for layer, g in enumerate(groups):
        assert g.shape == (2, 16)  # every patch has exactly one token
        # the patches map onto exactly the non-prefix tokens leaving the block: nothing lost, none empty
        for b in range(2):
            assert sorted(set(g[b].tolist())) == list(range(num_prefix, tokens[layer + 1]))
    size = model.blocks.final_size  # (B, N, 1): patches per token, tracked by the merge itself
    for b in range(2):
        counts = np.bincount(groups[-1][b], minlength=tokens[-1])
        assert np.array_equal(counts[num_prefix:], size[b, num_prefix:, 0].round().long().numpy())
    assert model.blocks.record_slots is False  # restored


def test_unpatched_model_is_identity():
    groups = patch_groups(tiny_vit(), torch.randn(1, 3, 32, 32))
    assert all(np.array_equal(g[0], np.arange(1, 17)) for g in groups)


def test_render_groups_mean_colour_and_edges():
    image = np.zeros((32, 32, 3), dtype=np.float32)
    image[:, 16:] = 1.0
    groups = np.array([1, 1, 2, 2] * 4)  # left half one group, right half another (4x4 grid)
    pic = render_groups(image, groups, (4, 4), scale=1)
    assert pic.shape == (32, 32, 3)
    assert np.allclose(pic[5, 5], 0.0) and np.allclose(pic[5, 20], 1.0)
    assert np.allclose(pic[:, 16], 1.0)  # the boundary column is drawn


def test_cli_visualize_writes_png(tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(src)
    out = tmp_path / "vis.png"
    rc = main(["visualize", "--image", str(src), "--model", "vit_tiny_patch16_224", "--model-kwargs",
               "img_size=32,patch_size=8,depth=3,embed_dim=48,num_heads=3,num_classes=10",
               "--method", "tome", "--r", "4", "--per-layer", "--out", str(out), "--json"])
    assert rc == 0, capsys.readouterr().err
    assert out.read_bytes()[:8] == PNG_MAGIC
    with Image.open(out) as im:
        im.verify()
    import json

    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == [0, 1, 2] and summary["groups"] == [12, 8, 4]


def test_cli_visualize_bad_image(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    for image in (str(bad), str(tmp_path / "absent.png")):
        rc = main(["visualize", "--image", image, "--model", "vit_tiny_patch16_224", "--model-kwargs",
                   "img_size=32,patch_size=8,depth=3", "--r", "2", "--out", str(tmp_path / "v.png")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
