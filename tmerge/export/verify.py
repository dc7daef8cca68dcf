"""Parity of an exported graph with the PyTorch merged model, telling near-ties from bugs.

Matching is discrete: two runtimes computing the same similarities 1e-7 apart can rank a near-tie
differently, route one token elsewhere and move the outputs far more than float noise. So besides
the outputs (fp32: max abs diff <= atol, never loosened), the verification graph outputs each
merging layer's *slots* (where every token went), which are compared with PyTorch's own
(``model.blocks.recording_slots()``). When the outputs differ beyond atol:

* same slots everywhere  -> the graph computes something else: a bug, fail;
* different slots        -> replay PyTorch with the runtime's choices. If the replay matches within
  atol, the graph is right and the inputs hit a near-tie: record it and verify again on the next
  fixed input (up to ``len(SEEDS)``); if the replay does not match, fail.

Runtime kernels can be wrong where PyTorch is right (ONNX Runtime's CPU ScatterND(add) loses updates
when 2+ threads run it), and only show it on some runs. So every claimed runtime (ONNX Runtime, and
OpenVINO when installed; see :func:`claimed_runtimes`) runs the final graph the way deployments do:
with its default threading and with 2 intra-op threads, ``RUNS`` times on one session each, and
must give bit-identical outputs every run and stay within atol of PyTorch.

The result (``parity`` in the manifest) records the error per input, slot mismatches per layer, the
near-ties met, the runtimes (with versions, threads asked for and in effect, precision), the batch
sizes, and every repeated-run check.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import runtime
from ..errors import TmergeError, VerificationError
from ..models.forward import input_shape
from ..patch import ReplayStep, merging_blocks

SEEDS = (0, 1, 2)


def fixed_inputs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 + seed))


RUNS = 20
THREADS = (None, 2)  # the runtime's default pool (what a deployment that sets nothing gets), and 2 threads
VERIFIED_RUNTIMES = ("onnxruntime", "openvino")


def claimed_runtimes(names: tuple[str, ...] = VERIFIED_RUNTIMES) -> list[tuple[str, str]]:
    """(runtime, device) pairs an ONNX export is verified on: those of ``names`` installed here, on
    CPU and, where the runtime has it, CUDA. (Plugin graphs claim ONNX Runtime only: OpenVINO does
    not expand the merge nodes' local functions.)"""
    return [(name, device) for name in names for device in runtime.DEVICES if name in runtime.available_backends(device)]


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


def compare_once(model, runner, images, merged_layers, atol):
    """One input: output error, slot mismatches per layer, and the verdict (ok / tie / bug).
    ``runner.run(images)`` gives the graph's outputs (final output, then each layer's slots)."""
    ref, plans = torch_reference(model, images)
    results = runner.run(images)
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


def recheck_file(model: nn.Module, onnx_path, *, batch_size: int = 2, atol: float = 1e-4) -> dict:
    """Run an exported file (ONNX in ONNX Runtime, an IR ``.xml`` in OpenVINO) against ``model`` (rebuilt from the file's manifest) on
    fixed inputs: the parity a profile of the file reports, measured now rather than read from the
    manifest. Outputs that differ on every input mean the file computes something else than the
    manifest says (another schedule, method or model): a TmergeError. Differences on only some
    inputs are recorded as near-ties (discrete matching can rank a near-tie differently)."""
    name = "openvino" if str(onnx_path).lower().endswith(".xml") else "onnxruntime"
    runner = runtime.create(name, str(onnx_path), threads=1)
    checks = []
    for seed in SEEDS:
        images = fixed_inputs((batch_size, *input_shape(model)[1:]), seed)
        ref, _ = torch_reference(model, images)
        out = runner.run(images)[0]
        checks.append(float(np.abs(out - ref.numpy()).max()) if out.shape == tuple(ref.shape) else float("inf"))
    matched = sum(err <= atol for err in checks)
    if matched == 0:
        raise TmergeError(f"{onnx_path} does not compute what its manifest describes (max abs diff "
                          f"{min(checks):.3g} > {atol:g} against the model rebuilt from the manifest on every "
                          "input); re-export it")
    return {"verified": matched == len(checks), "checked_by": "profile (on load)", "atol": atol,
            "max_abs_diff": max(checks), "inputs": len(checks), "inputs_matched": matched,
            "batches": [batch_size], "runtime": runner.describe()}


def verify_graph(model: nn.Module, proto_with_slots, final_proto, *, merged_layers: list[int], batch_size: int,
                 dynamic_batch: bool, atol: float = 1e-4, runs: int = RUNS,
                 runtimes: tuple[str, ...] = VERIFIED_RUNTIMES) -> dict:
    """Verify the slot-instrumented graph and the final graph on every claimed runtime; raise
    VerificationError or return the parity record."""
    parity: dict = {"atol": atol, "dtype": "float32", "inputs": "torch.randn, seeds 1000+i", "checks": [],
                    "near_ties": [], "repeats": []}
    batches = [batch_size]
    if dynamic_batch:
        batches.append(1 if batch_size != 1 else 3)
    worst = 0.0
    claimed = []
    for name, device in claimed_runtimes(runtimes):
        slots_runner = runtime.create(name, proto_with_slots, device=device)
        finals = [runtime.create(name, final_proto, device=device, threads=t) for t in THREADS]
        claimed.append({"runtime": name, "device": device, "versions": slots_runner.versions(),
                         "threads": [f.settings() for f in finals]})
        where = f"{name}/{device}"
        for batch in batches:
            passed = None
            for seed in SEEDS:
                images = fixed_inputs(input_shape(model, batch), seed)
                entry, out = compare_once(model, slots_runner, images, merged_layers, atol)
                entry.update(runtime=name, device=device, batch=batch, seed=seed)
                parity["checks"].append(entry)
                if entry["verdict"] == "bug":
                    raise VerificationError(_bug_message(entry, atol))
                if entry["verdict"] == "near-tie":
                    parity["near_ties"].append({k: entry[k] for k in ("runtime", "device", "batch", "seed",
                                                                       "first_tie_layer", "slot_mismatch",
                                                                       "max_abs_diff", "replay_max_abs_diff")})
                    continue
                passed = (images, out)
                worst = max(worst, entry["max_abs_diff"])
                break
            if passed is None:
                raise VerificationError(
                    f"parity ({where}, batch {batch}): every fixed input hit a near-tie in the matching "
                    f"(first at layer {parity['near_ties'][-1]['first_tie_layer']}); the graph reproduces PyTorch "
                    "given the same choices, but the outputs differ by more than "
                    f"{atol:g}: {parity['near_ties'][-1]['max_abs_diff']:.3g}"
                )
            images, _ = passed
            reference = torch_reference(model, images)[0].numpy()
            for final in finals:
                record = repeat_check(final, images, reference, runs=runs, atol=atol)
                record.update(runtime=name, device=device, batch=batch)
                parity["repeats"].append(record)
                if not record["bit_identical"] or record["max_abs_diff"] > atol:
                    raise VerificationError(repeat_message(record, atol))
    parity["max_abs_diff"] = worst
    if not claimed:
        raise VerificationError(f"none of {', '.join(runtimes)} is installed to verify the graph on")
    parity["runtimes"] = claimed
    parity["runs_per_session"] = runs
    parity["batches"] = batches
    parity["verified"] = True
    return parity


def repeat_check(runner, images: torch.Tensor, reference: np.ndarray, *, runs: int, atol: float) -> dict:
    """Run ``runner`` ``runs`` times on one session and input: how many distinct outputs it gave
    (1 = bit-identical) and the largest difference from PyTorch's ``reference`` output."""
    run = runner.prepare(images)
    outputs = [runner.outputs(run())[0] for _ in range(runs)]
    distinct = len({o.tobytes() for o in outputs})
    settings = runner.settings()
    return {"threads": "default" if runner.threads is None else runner.threads,
            "threads_in_effect": settings.get("threads_in_effect"), "runs": runs, "distinct_outputs": distinct,
            "bit_identical": distinct == 1, "max_abs_diff": float(max(np.abs(o - reference).max() for o in outputs))}


def repeat_message(record: dict, atol: float) -> str:
    where = (f"{record['runtime']}/{record['device']}, {record['threads']} threads, batch {record['batch']}, "
             f"{record['runs']} runs on one session")
    if not record["bit_identical"]:
        return (f"the graph is not deterministic ({where}): {record['distinct_outputs']} different outputs, "
                f"up to {record['max_abs_diff']:.3g} from PyTorch; a runtime kernel races (use another "
                "--merge-form)")
    return f"parity failed on repeated runs ({where}): max abs diff {record['max_abs_diff']:.3g} > {atol:g}"


def _bug_message(entry: dict, atol: float) -> str:
    where = f"{entry['runtime']}/{entry['device']}, batch {entry['batch']}, seed {entry['seed']}"
    if entry["slot_mismatch"]:
        return (f"parity failed ({where}): max abs diff {entry['max_abs_diff']:.3g} > {atol:g}, and PyTorch "
                f"replaying the runtime's merge choices still differs by {entry['replay_max_abs_diff']:.3g}")
    return (f"parity failed ({where}): max abs diff {entry['max_abs_diff']:.3g} > {atol:g} with identical merge "
            "choices in every layer (an export bug, not a near-tie)")
