"""ONNX Runtime: the one place tmerge builds an ``InferenceSession``.

CPU by default; ``device="cuda"`` uses the CUDA execution provider, and ``providers`` may name
others the build has (e.g. ``TensorrtExecutionProvider``), always with the CPU provider last.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TmergeError
from .runner import Runner, artifact_bytes, as_array


def session(model: Any, *, device: str = "cpu", threads: int | None = None, providers: list[str] | None = None,
            spinning: bool | None = None, profile_prefix: str | None = None):
    """An ``onnxruntime.InferenceSession`` for ``model`` (path, bytes or ModelProto).

    ``threads=None`` keeps ONNX Runtime's default intra-op pool (one thread per physical core),
    i.e. what a deployment gets; ``spinning=False`` stops idle pool threads from spinning (needed
    when two sessions are timed interleaved); ``profile_prefix`` turns on ORT's node profiler."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    chosen = list(providers or (["CUDAExecutionProvider"] if device == "cuda" else []))
    available = ort.get_available_providers()
    missing = [p for p in chosen if p not in available]
    if missing:
        raise TmergeError(f"this onnxruntime build has no {', '.join(missing)} (it has {', '.join(available)})")
    chosen = [p for p in chosen if p != "CPUExecutionProvider"] + ["CPUExecutionProvider"]
    source = artifact_bytes(model)
    try:
        return ort.InferenceSession(source, options, providers=chosen)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... classes
        where = source if isinstance(source, str) else "the graph"
        raise TmergeError(f"onnxruntime cannot load {where}: {str(e).strip().splitlines()[0]}") from e


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime's own defaults unless asked otherwise; latency timing turns pool spinning off
    (with two sessions timed interleaved, one session's spinning pool would steal the other's cores)."""

    def __init__(self, model: Any, *, device: str = "cpu", threads: int | None = None,
                 providers: list[str] | None = None, spinning: bool | None = None,
                 profile_prefix: str | None = None) -> None:
        super().__init__(model, device=device, threads=threads)
        self.providers, self.spinning, self.profile_prefix = providers, spinning, profile_prefix

    @classmethod
    def check_device(cls, device: str) -> None:
        import onnxruntime as ort

        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise TmergeError("--device cuda: this onnxruntime build has no CUDAExecutionProvider "
                              "(pip install onnxruntime-gpu)")

    def load(self) -> OnnxRuntimeRunner:
        self.session = session(self.model, device=self.device, threads=self.threads, providers=self.providers,
                               spinning=self.spinning, profile_prefix=self.profile_prefix)
        self.input_name = self.session.get_inputs()[0].name
        return self

    def prepare(self, images: torch.Tensor):
        return self.prepare_feeds({self.input_name: images})

    def prepare_feeds(self, feeds: dict[str, Any]):
        arrays = {name: as_array(value) for name, value in feeds.items()}
        run = self.session.run
        return lambda: run(None, arrays)

    def end_profiling(self) -> str:
        """Path of ORT's profiling JSON (with ``profile_prefix``)."""
        return self.session.end_profiling()

    def versions(self) -> dict[str, str | None]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__}

    def settings(self) -> dict[str, Any]:
        options = self.session.get_session_options()
        return {"threads": self.threads, "threads_in_effect": options.intra_op_num_threads or "default (physical cores)",
                "providers": self.session.get_providers(), "precision": "fp32",
                "spinning": self.spinning if self.spinning is not None else "default"}
