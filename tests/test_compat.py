"""`import tmerge` and torchvision: the CPU shim fires only when torchvision fails for want of its
operator schemas, and never breaks a torchvision whose own extension registers them."""

import subprocess
import sys
import textwrap

# A matching torchvision build registers its operator schemas itself when its extension loads.
MATCHING_BUILD = """
    import torch
    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    KIND = "matching"
"""
# A CUDA build on a CPU torch: no extension, so registering its fake kernels finds no schema.
CUDA_BUILD_ON_CPU_TORCH = """
    import torch
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
    except RuntimeError:
        raise RuntimeError("operator torchvision::nms does not exist")
    KIND = "cuda-on-cpu"
"""
BROKEN = """
    raise RuntimeError("something else entirely")
"""


def run_with_torchvision(tmp_path, source: str, code: str) -> subprocess.CompletedProcess:
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})


def test_a_matching_torchvision_is_left_alone(tmp_path):
    done = run_with_torchvision(tmp_path, MATCHING_BUILD,
                                "import tmerge, torchvision, torch; print(torchvision.KIND, "
                                "hasattr(tmerge._compat.import_torchvision, 'library'))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["matching", "False"]


def test_the_schemas_are_declared_where_torchvision_lacks_them(tmp_path):
    done = run_with_torchvision(tmp_path, CUDA_BUILD_ON_CPU_TORCH,
                                "import tmerge, torchvision; print(torchvision.KIND, "
                                "hasattr(tmerge._compat.import_torchvision, 'library'))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cuda-on-cpu", "True"]


def test_other_torchvision_failures_are_not_hidden(tmp_path):
    done = run_with_torchvision(tmp_path, BROKEN, "import tmerge")
    assert done.returncode != 0 and "something else entirely" in done.stderr


def test_the_installed_torchvision_imports_after_tmerge():
    done = subprocess.run([sys.executable, "-c", "import tmerge, timm, torchvision"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
