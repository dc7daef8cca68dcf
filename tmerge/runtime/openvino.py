"""OpenVINO (CPU plugin): reads the ONNX graph (or an IR ``.xml``) and compiles it.

fp32 by default: OpenVINO's CPU plugin otherwise picks bf16 on CPUs that support it, which is not
the model that was verified. The precision hint, threads and performance hint in effect are read
back from the compiled model and reported.
"""

from __future__ import annotations

from typing import Any

import torch

from .runner import Runner, artifact_bytes, as_array


def core():
    import openvino as ov

    if not hasattr(core, "instance"):
        core.instance = ov.Core()
    return core.instance


def read_model(model: Any):
    """An ``openvino.Model`` from an ONNX path/bytes/ModelProto or an IR ``.xml`` path."""
    return core().read_model(artifact_bytes(model))


class OpenVINORunner(Runner):
    def __init__(self, model: Any, *, device: str = "cpu", threads: int | None = None, precision: str = "f32",
                 perf_counts: bool = False) -> None:
        super().__init__(model, device=device, threads=threads)
        self.precision, self.perf_counts = precision, perf_counts

    def load(self) -> OpenVINORunner:
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.precision}
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = self.threads
        if self.perf_counts:
            config["PERF_COUNT"] = True
        self.compiled = core().compile_model(read_model(self.model), "CPU", config)
        self.request = self.compiled.create_infer_request()
        return self

    def prepare(self, images: torch.Tensor):
        return self.prepare_feeds({0: images})

    def prepare_feeds(self, feeds: dict[Any, Any]):
        arrays = {name: as_array(value) for name, value in feeds.items()}
        request = self.request
        n_out = len(self.compiled.outputs)

        def run():
            request.infer(arrays)
            return [request.get_output_tensor(i).data.copy() for i in range(n_out)]

        return run

    def profiling_info(self) -> list:
        """Per-node timings of the last inference (with ``perf_counts=True``)."""
        return list(self.request.get_profiling_info())

    def versions(self) -> dict[str, str | None]:
        import openvino as ov

        return {"openvino": ov.get_version()}

    def settings(self) -> dict[str, Any]:
        prop = self.compiled.get_property
        hint = prop("PERFORMANCE_HINT")
        return {"threads": self.threads, "threads_in_effect": int(prop("INFERENCE_NUM_THREADS")),
                "precision": prop("INFERENCE_PRECISION_HINT").get_type_name(),
                "performance_hint": getattr(hint, "name", str(hint)), "ov_device": "CPU"}
