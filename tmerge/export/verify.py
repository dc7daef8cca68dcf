"""Parity of an exported graph with the PyTorch merged model, telling near-ties from bugs.

Matching is discrete: two runtimes computing the same similarities 1e-7 apart can rank a near-tie
differently, route one token elsewhere and move the outputs far more than float noise. So besides
the outputs (fp32: max abs diff <= atol, never loosened), the verification graph outputs each
merging layer's *slots* (where every token went), which are compared with PyTorch's own
(``model.blocks.recording_slots()``). When the outputs differ beyond atol:

* same slots everywhere  -> the graph computes something else: a bug, fail;
* different slots        -> replay PyTorch with ONNX Runtime's choices. If the replay matches within
  atol, the graph is right and the inputs hit a near-tie: record it and verify again on the next
  fixed input (up to ``len(SEEDS)``); if the replay does not match, fail.

The result (``parity`` in the manifest) records the error per input, slot mismatches per layer, the
near-ties met, and which execution providers and batch sizes were checked.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import VerificationError
from ..models.forward import input_shape
from ..patch import ReplayStep, merging_blocks

SEEDS = (0, 1, 2)


def fixed_inputs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 + seed))


def ort_session(proto, provider: str = "CPUExecutionProvider", *, threads: int | None = None, profile: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    data = proto if isinstance(proto, (bytes, str)) else proto.SerializeToString()
    return ort.InferenceSession(data, options, providers=[provider])


def providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CPUExecutionProvider", "CUDAExecutionProvider") if p in available]


def torch_reference(model: nn.Module, images: torch.Tensor):
    """Outputs and per-layer slots (None where a layer does not merge) of the PyTorch model."""
    blocks = merging_blocks(model)
    if blocks is None:
        with torch.no_grad():
            return model(images), []
    with torch.no_grad(), blocks.recording_slots():
        out = model(images)
        return out, list(blocks.last_slots)


def torch_replay(model: nn.Module, images: torch.Tensor, slots_by_layer: dict[int, np.ndarray]) -> torch.Tensor:
    """PyTorch forward that merges with the given per-layer slots instead of choosing its own."""
    forced = [torch.from_numpy(np.asarray(slots_by_layer[l])).long() if l in slots_by_layer else None
              for l in range(len(model.blocks))]
    with torch.no_grad(), merging_blocks(model).using(ReplayStep(forced)):
        return model(images)


def compare_once(model, session, images, merged_layers, atol):
    """One input: output error, slot mismatches per layer, and the verdict (ok / tie / bug)."""
    ref, plans = torch_reference(model, images)
    results = session.run(None, {"images": images.numpy()})
    out = results[0]
    ort_slots = dict(zip(merged_layers, results[1:]))
    err = float(np.abs(out - ref.numpy()).max())
    mismatch = {}
    for layer in merged_layers:
        t = plans[layer].numpy()
        o = ort_slots[layer]
        rows = (t != o).reshape(t.shape[0], t.shape[1], -1).any(-1)
        if rows.any():
            mismatch[layer] = int(rows.sum())
    entry = {"max_abs_diff": err, "slot_mismatch": mismatch}
    if err <= atol:
        entry["verdict"] = "ok" if not mismatch else "ok-with-ties"
        return entry, out
    if not mismatch:
        entry["verdict"] = "bug"
        return entry, out
    replay = torch_replay(model, images, ort_slots)
    entry["replay_max_abs_diff"] = float(np.abs(out - replay.numpy()).max())
    entry["first_tie_layer"] = min(mismatch)
    entry["verdict"] = "near-tie" if entry["replay_max_abs_diff"] <= atol else "bug"
    return entry, out


def recheck_file(model: nn.Module, onnx_path, *, batch_size: int = 2, atol: float = 1e-4,
                 input_name: str = "images") -> dict:
    """Run an exported file in ONNX Runtime against ``model`` (rebuilt from the file's manifest) on
    fixed inputs: the parity a profile of the file reports, measured now rather than read from the
    manifest. Outputs that differ on every input mean the file computes something else than the
    manifest says (another schedule, method or model): a TmergeError. Differences on only some
    inputs are recorded as near-ties (discrete matching can rank a near-tie differently)."""
    from .._optional import require
    from ..errors import TmergeError

    require("onnxruntime")
    session = ort_session(str(onnx_path), threads=1)
    checks = []
    for seed in SEEDS:
        images = fixed_inputs((batch_size, *input_shape(model)[1:]), seed)
        ref, _ = torch_reference(model, images)
        out = session.run(None, {input_name: images.numpy()})[0]
        checks.append(float(np.abs(out - ref.numpy()).max()) if out.shape == tuple(ref.shape) else float("inf"))
    matched = sum(err <= atol for err in checks)
    if matched == 0:
        raise TmergeError(f"{onnx_path} does not compute what its manifest describes (max abs diff "
                          f"{min(checks):.3g} > {atol:g} against the model rebuilt from the manifest on every "
                          "input); re-export it")
    return {"verified": matched == len(checks), "checked_by": "profile (on load)", "atol": atol,
            "max_abs_diff": max(checks), "inputs": len(checks), "inputs_matched": matched,
            "batches": [batch_size], "providers": ["CPUExecutionProvider"]}


def verify_graph(model: nn.Module, proto_with_slots, final_proto, *, merged_layers: list[int], batch_size: int,
                 dynamic_batch: bool, atol: float = 1e-4) -> dict:
    """Verify both the slot-instrumented graph and the final graph; raise VerificationError or
    return the parity record."""
    parity: dict = {"atol": atol, "dtype": "float32", "inputs": "torch.randn, seeds 1000+i", "checks": [],
                    "near_ties": []}
    batches = [batch_size]
    if dynamic_batch:
        batches.append(1 if batch_size != 1 else 3)
    worst = 0.0
    for provider in providers():
        session = ort_session(proto_with_slots, provider)
        final = ort_session(final_proto, provider)
        for batch in batches:
            passed = None
            for seed in SEEDS:
                images = fixed_inputs(input_shape(model, batch), seed)
                entry, out = compare_once(model, session, images, merged_layers, atol)
                entry.update(provider=provider, batch=batch, seed=seed)
                parity["checks"].append(entry)
                if entry["verdict"] == "bug":
                    raise VerificationError(_bug_message(entry, atol))
                if entry["verdict"] == "near-tie":
                    parity["near_ties"].append({k: entry[k] for k in ("provider", "batch", "seed", "first_tie_layer",
                                                                       "slot_mismatch", "max_abs_diff",
                                                                       "replay_max_abs_diff")})
                    continue
                passed = (images, out)
                worst = max(worst, entry["max_abs_diff"])
                break
            if passed is None:
                raise VerificationError(
                    f"parity ({provider}, batch {batch}): every fixed input hit a near-tie in the matching "
                    f"(first at layer {parity['near_ties'][-1]['first_tie_layer']}); the graph reproduces PyTorch "
                    "given the same choices, but the outputs differ by more than "
                    f"{atol:g}: {parity['near_ties'][-1]['max_abs_diff']:.3g}"
                )
            images, out = passed
            (final_out,) = final.run(None, {"images": images.numpy()})
            diff = float(np.abs(final_out - out).max())
            if diff > atol:
                raise VerificationError(
                    f"the final graph ({provider}, batch {batch}) differs from the verified graph by {diff:.3g}"
                )
    parity["max_abs_diff"] = worst
    parity["providers"] = providers()
    parity["batches"] = batches
    parity["verified"] = True
    return parity


def _bug_message(entry: dict, atol: float) -> str:
    where = f"{entry['provider']}, batch {entry['batch']}, seed {entry['seed']}"
    if entry["slot_mismatch"]:
        return (f"parity failed ({where}): max abs diff {entry['max_abs_diff']:.3g} > {atol:g}, and PyTorch "
                f"replaying ONNX Runtime's merge choices still differs by {entry['replay_max_abs_diff']:.3g}")
    return (f"parity failed ({where}): max abs diff {entry['max_abs_diff']:.3g} > {atol:g} with identical merge "
            "choices in every layer (an export bug, not a near-tie)")
