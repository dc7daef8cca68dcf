"""Export a (merged) timm ViT to ONNX: a portable graph or one with merge plugin nodes.

Both forms come from ``torch.onnx.export(..., dynamo=True)`` at opset >= 18 with only the batch
dimension dynamic (a fixed schedule makes every other shape static).

* ``ops="portable"``: standard ONNX ops only (TopK, ArgMax, GatherElements, ScatterElements(add),
  CumSum, ...): runs in any ONNX runtime.
* ``ops="plugin"``: every merge is a single node ``tmerge::BipartiteMerge`` (ToMe) or
  ``tmerge::PiToMeMerge`` carrying ``plugin_namespace="tmerge"``, ``plugin_version="1"``, ``r`` and
  the method's parameters (see :mod:`tmerge.plugins.spec`), plus an ONNX local function of the same
  name in domain ``tmerge`` whose body is the portable merge subgraph. Shapes are static per layer,
  so each layer has its own function *overload* (``layer0``, ``layer1``, ...; ONNX IR >= 10). ONNX
  Runtime inlines the functions; TensorRT's ONNX parser binds a node carrying ``plugin_namespace``
  to the registered plugin of that name and version instead.

How the plugin form is built: during export, the block's merge step (``tmerge.patch.merge_step``)
is replaced by a ``torch.library.custom_op`` (``tmerge::merge_step``) that is translated, through
``custom_translation_table``, into the custom-domain node. Each node's function body is the same
merge step exported on its own (inputs x, size, keys; dynamic batch), i.e. exactly the portable
subgraph.

Verification (see :mod:`tmerge.export.verify`) runs a graph that also outputs every layer's
slots (where each token went), compares outputs and chosen indices with PyTorch, then strips the
slot outputs and checks the final graph once more before it is written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import TmergeError, VerificationError, missing_extra
from ..plugins import spec as plugin_spec

MIN_OPSET = 18
OPS_FORMS = ("portable", "plugin")
SLOTS_PREFIX = "tmerge_slots_"


@dataclass
class ExportResult:
    path: Path
    manifest_path: Path
    manifest: dict
    parity: dict
    model_proto: Any = field(default=None, repr=False)  # the written onnx.ModelProto


# ----------------------------------------------------------------------------------------------
# input checks


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise missing_extra(getattr(e, "name", None) or "onnx", "onnx") from e


def check_opset(opset: int) -> int:
    import onnx

    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TmergeError(f"--opset must be an integer, got {opset!r}")
    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise TmergeError(
            f"opset {opset} is too old for this graph: the merge needs opset >= {MIN_OPSET} "
            "(ScatterElements with reduction, the dynamo exporter)"
        )
    if opset > newest:
        raise TmergeError(f"opset {opset} is newer than this onnx ({onnx.__version__}) knows: at most {newest}")
    return opset


def check_out_path(out: str | os.PathLike, suffixes: tuple[str, ...] = (".onnx",)) -> Path:
    """Fail early (before any work) when ``out`` cannot be written; nothing is created."""
    path = Path(out).expanduser()
    if str(out) == "" or path.name in ("", ".", ".."):
        raise TmergeError(f"--out {out!s} is not a file path")
    if path.is_dir():
        raise TmergeError(f"--out {path} is a directory; give a file name like {path / 'model.onnx'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise TmergeError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TmergeError(f"cannot write {path}: directory {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise TmergeError(f"cannot write {path}: the existing file is not writable")
    if suffixes and path.suffix.lower() not in suffixes:
        raise TmergeError(f"--out {path} should end in {' or '.join(suffixes)}")
    return path


# ----------------------------------------------------------------------------------------------
# model facts


def model_input_shape(model: nn.Module, batch: int) -> tuple[int, int, int, int]:
    pe = model.patch_embed
    h, w = (pe.img_size if pe.img_size is not None else (224, 224))
    in_chans = pe.proj.in_channels if hasattr(pe.proj, "in_channels") else 3
    return (batch, int(in_chans), int(h), int(w))


def _merging_blocks(model: nn.Module):
    from ..patch import MergingBlocks

    blocks = getattr(model, "blocks", None)
    return blocks if isinstance(blocks, MergingBlocks) else None


@contextlib.contextmanager
def unmerged(model: nn.Module):
    """Temporarily run a patched model without merging (schedule r = 0 everywhere)."""
    blocks = _merging_blocks(model)
    if blocks is None:
        yield model
        return
    saved = blocks.schedule
    n = saved.tokens[0]
    blocks.schedule = dataclasses.replace(saved, r=[0] * len(saved.r), tokens=[n] * len(saved.tokens), capped=[])
    try:
        yield model
    finally:
        blocks.schedule = saved


# ----------------------------------------------------------------------------------------------
# exporting the graph


_HANDLES: dict[int, dict] = {}
_HANDLE_IDS = itertools.count(1)


def _custom_op():
    """``tmerge::merge_step(x, size, keys, handle) -> (x_out, size_out, slots)`` (export only)."""
    if hasattr(_custom_op, "op"):
        return _custom_op.op

    @torch.library.custom_op("tmerge::merge_step", mutates_args=())
    def merge_step_op(x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, handle: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        info = _HANDLES[handle]
        out, out_size, plan = _run_step(info, x, size, keys)
        return out, out_size, plan.slots.clone()

    @merge_step_op.register_fake
    def _(x, size, keys, handle):
        info = _HANDLES[handle]
        n_out = info["spec"].num_out
        return (x.new_empty(x.shape[0], n_out, x.shape[2]), size.new_empty(x.shape[0], n_out, 1),
                x.new_empty(x.shape[0], x.shape[1], dtype=torch.long))

    _custom_op.op = merge_step_op
    return merge_step_op


def _run_step(info: dict, x, size, keys):
    from .. import patch
    from ..merging import BlockInput

    merge_step = getattr(patch.merge_step, "_tmerge_original", patch.merge_step)
    block = BlockInput(layer=info["layer"], depth=info["depth"], r=info["r"], num_prefix=info["num_prefix"],
                       keys=keys, attn_input=x, x=x, size=size)
    return merge_step(info["method"], block, info["form"])


def _onnx_schema(op_type: str):
    from onnx.defs import OpSchema

    P = OpSchema.FormalParameter
    kinds = {int: OpSchema.AttrType.INT, float: OpSchema.AttrType.FLOAT, str: OpSchema.AttrType.STRING}
    return OpSchema(
        op_type, plugin_spec.DOMAIN, plugin_spec.DOMAIN_VERSION,
        doc=f"tmerge token merge ({op_type}); body: ONNX local function of the same name",
        inputs=[P("x", "T"), P("size", "T"), P("keys", "T")],
        outputs=[P("x_out", "T"), P("size_out", "T"), P("slots", "I")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("I", ["tensor(int64)"], "")],
        attributes=[OpSchema.Attribute(k, kinds[t], k) for k, t in plugin_spec.ATTRIBUTES[op_type].items()],
    )


def _translate_merge_step(x, size, keys, handle):
    from onnxscript.values import Op, Opset

    info = _HANDLES[handle]
    spec = info["spec"]
    opset = Opset(plugin_spec.DOMAIN, plugin_spec.DOMAIN_VERSION)
    return Op(opset, spec.op_type, _onnx_schema(spec.op_type))(x, size, keys, **spec.attrs)


class _Capture(nn.Module):
    """Wraps the model so the per-layer slots become extra outputs (verification graph)."""

    def __init__(self, model: nn.Module, slots: list):
        super().__init__()
        self.model = model
        self._slots = slots

    def forward(self, x):
        self._slots.clear()
        out = self.model(x)
        return (out, *self._slots)


@contextlib.contextmanager
def _patched_merge_step(model: nn.Module, ops: str, slots: list, forced: list | None = None):
    """Replace ``tmerge.patch.merge_step`` while exporting / replaying. ``slots`` collects each
    merged layer's slots; ``ops="plugin"`` routes the step through the custom op; ``forced`` (a list
    of per-layer slot tensors) replays given choices instead of the method's."""
    from .. import patch
    from ..merging import MergePlan, merge_tokens

    original = patch.merge_step
    blocks = _merging_blocks(model)
    handles: list[int] = []
    class_token = getattr(model, "cls_token", None) is not None

    def step(method, block, form="scatter_nd"):
        if forced is not None:
            s = forced[block.layer]
            num_out = block.x.shape[1] - block.r
            x, size = merge_tokens(block.x, block.size, s, num_out, form=form)
            plan = MergePlan(slots=s, num_out=num_out)
        elif ops == "plugin":
            spec = plugin_spec.node_spec(method, layer=block.layer, depth=block.depth, r=block.r,
                                         num_tokens=block.x.shape[1], num_prefix=block.num_prefix,
                                         class_token=class_token, merge_form=form)
            handle = next(_HANDLE_IDS)
            _HANDLES[handle] = {"method": method, "layer": block.layer, "depth": block.depth, "r": block.r,
                                "num_prefix": block.num_prefix, "form": form, "spec": spec}
            handles.append(handle)
            x, size, s = _custom_op()(block.x, block.size, block.keys, handle)
            plan = MergePlan(slots=s, num_out=spec.num_out)
        else:
            x, size, plan = original(method, block, form)
        slots.append(plan.slots)
        return x, size, plan

    step._tmerge_original = original
    patch.merge_step = step
    try:
        yield handles
    finally:
        patch.merge_step = original
        if blocks is not None:
            blocks._keys.clear()


def _light_optimize(proto):
    """Constant folding + dead-code and common-subexpression elimination (the full onnxscript
    optimizer's pattern rewriter costs seconds per export for nothing we need)."""
    import onnx_ir as ir
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass, RemoveUnusedNodesPass
    from onnxscript import optimizer

    model = ir.from_proto(proto)
    optimizer.fold_constants(model)
    RemoveUnusedNodesPass()(model)
    CommonSubexpressionEliminationPass()(model)
    RemoveUnusedNodesPass()(model)
    return ir.to_proto(model)


def _sort_translation(self, *args, stable=None, dim=-1, descending=False):
    """aten.sort.stable (PiToMe's energy ranking) as ONNX TopK over the whole axis: TopK's sorted
    output breaks ties by the lower index first, i.e. a stable sort, ascending or descending."""
    from onnxscript import opset18 as op

    if args:  # positional (dim, descending) if ever given
        dim = args[0] if len(args) > 0 else dim
        descending = args[1] if len(args) > 1 else descending
    rank = len(self.shape)
    axis = dim % rank
    size = self.shape[axis]
    if isinstance(size, int):
        k = op.Constant(value_ints=[size])
    else:
        k = op.Slice(op.Shape(self), op.Constant(value_ints=[axis]), op.Constant(value_ints=[axis + 1]))
    values, indices = op.TopK(self, k, axis=axis, largest=1 if descending else 0, sorted=1)
    return values, indices


def _translation_table(extra: dict | None = None) -> dict:
    table = {torch.ops.aten.sort.stable: _sort_translation}
    if extra:
        table.update(extra)
    return table


def _torch_onnx_export(module: nn.Module, args: tuple, *, dynamic_batch: bool, opset: int,
                       input_names: list[str], output_names: list[str], custom_table=None, dynamic_shapes=None):
    import onnx

    if dynamic_shapes is None and dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = tuple({0: batch} for _ in args)
    if not dynamic_batch:
        dynamic_shapes = None
    with warnings.catch_warnings(), contextlib.redirect_stdout(_Sink()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
                input_names=input_names, output_names=output_names, optimize=False, verbose=False,
                custom_translation_table=_translation_table(custom_table), report=False, verify=False,
            )
        except TmergeError:
            raise
        except Exception as e:  # torch.export / onnx conversion failure
            raise VerificationError(f"torch.onnx.export failed: {_first_line(e)}") from e
    proto = program.model_proto
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    return _light_optimize(proto)


class _Sink:
    def write(self, _s):
        return 0

    def flush(self):
        pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def build_graph(model: nn.Module, *, ops: str = "portable", batch_size: int = 2, dynamic_batch: bool = True,
                opset: int = 18, with_slots: bool = True):
    """Export ``model`` to an ``onnx.ModelProto`` (input ``images``, output ``output`` and, with
    ``with_slots``, one ``tmerge_slots_<layer>`` int64 output per merging layer). Returns
    (proto, merged_layers)."""
    if ops not in OPS_FORMS:
        raise TmergeError(f"--ops must be one of {', '.join(OPS_FORMS)}, got {ops!r}")
    blocks = _merging_blocks(model)
    merged_layers = [l for l, r in enumerate(blocks.schedule.r) if r > 0] if blocks is not None else []
    example = torch.randn(model_input_shape(model, batch_size), generator=torch.Generator().manual_seed(0))
    slots: list = []
    output_names = ["output"] + [f"{SLOTS_PREFIX}{l}" for l in merged_layers]
    with torch.no_grad(), _patched_merge_step(model, ops, slots) as handles:
        wrapper = _Capture(model, slots).eval()
        custom = None
        if ops == "plugin":
            _custom_op()
            custom = {torch.ops.tmerge.merge_step.default: _translate_merge_step}
        try:
            proto = _torch_onnx_export(wrapper, (example,), dynamic_batch=dynamic_batch, opset=opset,
                                       input_names=["images"], output_names=output_names, custom_table=custom)
            _strip_wrapper_prefix(proto)
            if ops == "plugin":
                proto = _attach_functions(proto, model, handles, dynamic_batch=dynamic_batch, opset=opset)
        finally:
            for h in handles:
                _HANDLES.pop(h, None)
    if not with_slots:
        proto = strip_slots(proto)
    return proto, merged_layers


def _strip_wrapper_prefix(proto, prefix: str = "model.") -> None:
    """Initializers keep the model's state-dict names (``head.bias``, not ``model.head.bias``)."""
    names = {i.name for i in proto.graph.initializer}
    taken = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input} | names
    rename = {n: n[len(prefix):] for n in names if n.startswith(prefix) and n[len(prefix):] not in taken}
    if not rename:
        return
    for init in proto.graph.initializer:
        init.name = rename.get(init.name, init.name)
    for node in proto.graph.node:
        for i, v in enumerate(node.input):
            if v in rename:
                node.input[i] = rename[v]
    for vi in proto.graph.value_info:
        vi.name = rename.get(vi.name, vi.name)


def _attach_functions(proto, model, handles, *, dynamic_batch: bool, opset: int):
    """Give every ``tmerge`` node its overload and a local function holding the portable body."""
    from onnx import helper

    infos = {_HANDLES[h]["layer"]: _HANDLES[h] for h in handles}
    functions = _merge_functions([infos[l] for l in sorted(infos)], model, dynamic_batch=dynamic_batch, opset=opset)
    for node in proto.graph.node:
        if node.domain != plugin_spec.DOMAIN:
            continue
        layer = next(a.i for a in node.attribute if a.name == "layer")
        node.overload = infos[layer]["spec"].overload
        node.name = f"blocks.{layer}.merge"
    del proto.functions[:]
    proto.functions.extend(functions)
    if proto.ir_version < 10:
        proto.ir_version = 10  # function overloads
    if not any(o.domain == plugin_spec.DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(plugin_spec.DOMAIN, plugin_spec.DOMAIN_VERSION))
    return proto


class _AllSteps(nn.Module):
    """Every layer's merge step side by side (inputs x_l, size_l, keys_l): one export for all bodies."""

    def __init__(self, infos: list[dict]):
        super().__init__()
        self.infos = infos

    def forward(self, *flat):
        outs = []
        for i, info in enumerate(self.infos):
            x, size, keys = flat[3 * i: 3 * i + 3]
            out, out_size, plan = _run_step(info, x, size, keys)
            outs += [out, out_size, plan.slots]
        return tuple(outs)


def _merge_functions(infos: list[dict], model: nn.Module, *, dynamic_batch: bool, opset: int) -> list:
    """The portable body of each merge as an ONNX FunctionProto (domain tmerge, overload layerN).

    All layers are exported together (one torch.onnx.export, each layer with its own batch symbol
    so no layer's body depends on another's inputs), then split by reachability from each
    layer's outputs."""
    from onnx import helper

    c = model.embed_dim
    args, dyn, in_names, out_names = [], [], [], []
    for info in infos:
        l, n = info["layer"], info["spec"].attrs["num_tokens"]
        attn = model.blocks[l].attn
        g = torch.Generator().manual_seed(l)
        args += [torch.randn(2, n, c, generator=g), torch.ones(2, n, 1),
                 torch.randn(2, attn.num_heads, n, attn.head_dim, generator=g)]
        in_names += [f"{name}_l{l}" for name in plugin_spec.INPUTS]
        out_names += [f"{name}_l{l}" for name in plugin_spec.VERIFY_OUTPUTS]
        batch = torch.export.Dim(f"batch_l{l}", min=1, max=4096)
        dyn += [{0: batch}] * 3 if dynamic_batch else [None] * 3
    body = _torch_onnx_export(_AllSteps(infos).eval(), tuple(args), dynamic_batch=dynamic_batch, opset=opset,
                              input_names=in_names, output_names=out_names, dynamic_shapes=(tuple(dyn),))
    producer = {o: node for node in body.graph.node for o in node.output}
    inits = {i.name: i for i in body.graph.initializer}
    opsets = [o for o in body.opset_import if o.domain != plugin_spec.DOMAIN]
    functions = []
    for info in infos:
        l, spec = info["layer"], info["spec"]
        rename = {f"{name}_l{l}": name for name in (*plugin_spec.INPUTS, *plugin_spec.VERIFY_OUTPUTS)}
        needed = [f"{name}_l{l}" for name in plugin_spec.VERIFY_OUTPUTS]
        seen, order, consts = set(), [], []
        stack = list(needed)
        while stack:  # nodes reachable backwards from this layer's outputs
            value = stack.pop()
            if value in seen or not value:
                continue
            seen.add(value)
            if value in inits:
                consts.append(value)
            elif value in producer:
                node = producer[value]
                if id(node) not in {id(n) for n in order}:
                    order.append(node)
                    stack.extend(node.input)
            elif value not in rename:
                raise VerificationError(f"merge body of layer {l} depends on foreign value {value!r}")
        positions = {id(n): i for i, n in enumerate(body.graph.node)}
        order.sort(key=lambda n: positions[id(n)])
        nodes = [helper.make_node("Constant", [], [rename.get(v, v)], value=inits[v]) for v in sorted(set(consts))]
        for node in order:
            copy = type(node)()
            copy.CopyFrom(node)
            del copy.metadata_props[:]
            for i, v in enumerate(copy.input):
                copy.input[i] = rename.get(v, v)
            for i, v in enumerate(copy.output):
                copy.output[i] = rename.get(v, v)
            nodes.append(copy)
        functions.append(helper.make_function(
            plugin_spec.DOMAIN, spec.op_type, list(plugin_spec.INPUTS), list(plugin_spec.VERIFY_OUTPUTS), nodes,
            opsets, attributes=list(plugin_spec.ATTRIBUTES[spec.op_type]),
            doc_string=f"portable body of {spec.op_type} at block {l}", overload=spec.overload,
        ))
    return functions


def strip_slots(proto):
    """The deployable graph: drop the per-layer slot outputs (graph and plugin nodes/functions)."""
    import onnx

    proto_out = onnx.ModelProto()
    proto_out.CopyFrom(proto)
    keep = [o for o in proto_out.graph.output if not o.name.startswith(SLOTS_PREFIX)]
    del proto_out.graph.output[:]
    proto_out.graph.output.extend(keep)
    for node in proto_out.graph.node:
        if node.domain == plugin_spec.DOMAIN and len(node.output) > len(plugin_spec.OUTPUTS):
            del node.output[len(plugin_spec.OUTPUTS):]
    for fn in proto_out.functions:
        if fn.domain == plugin_spec.DOMAIN and len(fn.output) > len(plugin_spec.OUTPUTS):
            del fn.output[len(plugin_spec.OUTPUTS):]
    _prune(proto_out.graph)
    return proto_out


def _prune(graph) -> None:
    """Remove nodes whose outputs nobody needs (backwards from the graph outputs)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    vi = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(vi)


def describe_plugin_nodes(proto) -> list[dict]:
    """The merge nodes of a plugin graph: op type, overload, attributes."""
    from onnx import helper

    out = []
    for node in proto.graph.node:
        if node.domain == plugin_spec.DOMAIN:
            out.append({"name": node.name, "op_type": node.op_type, "overload": node.overload,
                        "attributes": {a.name: _attr_value(helper.get_attribute_value(a)) for a in node.attribute}})
    return out


def _attr_value(v):
    return v.decode() if isinstance(v, bytes) else v


# ----------------------------------------------------------------------------------------------
# writing


def _atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write to a temp file in the same directory; returns the temp path (caller renames)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def write_atomically(files: dict[Path, bytes]) -> None:
    """Write all files to temps first, then rename each into place; on failure nothing is left."""
    temps: dict[Path, Path] = {}
    try:
        for path, data in files.items():
            temps[path] = _atomic_write_bytes(path, data)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except OSError as e:
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise TmergeError(f"could not write {next(iter(files))}: {e.strerror or e}") from e


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("tmerge", "torch", "timm", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if out["onnxruntime"] is None:
        with contextlib.suppress(md.PackageNotFoundError):
            out["onnxruntime"] = md.version("onnxruntime-gpu")
    return out


def build_manifest(model: nn.Module, *, model_name: str | None, ops: str, opset: int, batch_size: int,
                   dynamic_batch: bool, parity: dict, proto, path: Path, extra: dict | None = None) -> dict:
    from ..models import weights_sha256
    from ..patch import merge_info
    from ..profiling.flops import count_flops

    info = merge_info(model)
    shape = model_input_shape(model, 1)
    with torch.no_grad():
        flops_merged = count_flops(model, shape)
        with unmerged(model):
            flops_unmerged = count_flops(model, shape)
    tokens = info.get("tokens")
    layers = []
    for l, r in enumerate(info["r"]):
        layers.append({"layer": l, "r": r, "tokens_in": tokens[l] if tokens else None,
                       "tokens_out": tokens[l + 1] if tokens else None})
    name = model_name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    manifest = {
        "format": "onnx",
        "file": path.name,
        "model": name,
        "weights_sha256": weights_sha256(model),
        "input": {"name": "images", "shape": ["batch" if dynamic_batch else batch_size, *shape[1:]],
                  "dtype": "float32"},
        "output": {"name": "output", "shape": ["batch" if dynamic_batch else batch_size,
                                               *[d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim[1:]]]},
        "dynamic_batch": dynamic_batch,
        "export_batch": batch_size,
        "ops": ops,
        "opset": opset,
        "ir_version": proto.ir_version,
        "method": info["method"],
        "options": info.get("options", {}),
        "prop_attn": info.get("prop_attn", False),
        "merge_form": info.get("merge_form"),
        "schedule": info.get("schedule"),
        "capped": info.get("capped", []),
        "layers": layers,
        "tokens": tokens,
        "flops": {
            "merged_per_image": flops_merged["per_image"],
            "unmerged_per_image": flops_unmerged["per_image"],
            "ratio": flops_merged["per_image"] / flops_unmerged["per_image"] if flops_unmerged["per_image"] else None,
            "merged_per_layer": flops_merged.get("per_layer"),
            "unmerged_per_layer": flops_unmerged.get("per_layer"),
            "convention": flops_merged["convention"],
        },
        "parity": parity,
        "versions": versions(),
        "created_unix": int(time.time()),
    }
    if ops == "plugin":
        manifest["plugin_nodes"] = describe_plugin_nodes(proto)
        manifest["plugin"] = {"namespace": plugin_spec.PLUGIN_NAMESPACE, "version": plugin_spec.PLUGIN_VERSION,
                              "domain": plugin_spec.DOMAIN}
    if extra:
        manifest.update(extra)
    return manifest


# ----------------------------------------------------------------------------------------------
# the API


def export_onnx(
    model: nn.Module,
    out_path: str | os.PathLike,
    *,
    batch_size: int = 2,
    dynamic_batch: bool = True,
    opset: int = 18,
    ops: str = "portable",
    verify: bool = True,
    atol: float = 1e-4,
    model_name: str | None = None,
    extra_manifest: dict | None = None,
) -> ExportResult:
    """Export a patched (or plain) timm ViT in eval mode to ONNX, verify it in ONNX Runtime against
    PyTorch, and write ``out_path`` plus the manifest ``<out_path>.json`` atomically.

    Raises :class:`TmergeError` (bad input, nothing done) or :class:`VerificationError` (the graph
    does not match PyTorch; nothing written).
    """
    _require_onnx()
    import onnx

    from .verify import verify_graph

    path = check_out_path(out_path)
    check_opset(opset)
    if ops not in OPS_FORMS:
        raise TmergeError(f"--ops must be one of {', '.join(OPS_FORMS)}, got {ops!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TmergeError(f"--batch must be a positive integer, got {batch_size!r}")
    if not atol > 0:
        raise TmergeError(f"atol must be > 0, got {atol!r}")
    if ops == "plugin":
        blocks = _merging_blocks(model)
        if blocks is not None and blocks.method.name not in plugin_spec.OP_TYPES:
            raise TmergeError(f"method {blocks.method.name!r} has no merge plugin; use --ops portable")
    model.eval()
    t0 = time.perf_counter()
    proto, merged_layers = build_graph(model, ops=ops, batch_size=batch_size, dynamic_batch=dynamic_batch,
                                       opset=opset, with_slots=True)
    export_s = time.perf_counter() - t0
    final = strip_slots(proto)
    try:
        onnx.checker.check_model(final, full_check=True)
    except Exception as e:
        raise VerificationError(f"the exported graph fails onnx.checker: {_first_line(e)}") from e
    if verify:
        parity = verify_graph(model, proto, final, merged_layers=merged_layers, batch_size=batch_size,
                              dynamic_batch=dynamic_batch, atol=atol)
    else:
        parity = {"verified": False}
    parity["export_seconds"] = round(export_s, 2)
    manifest_path = path.with_name(path.name + ".json")
    manifest = build_manifest(model, model_name=model_name, ops=ops, opset=opset, batch_size=batch_size,
                              dynamic_batch=dynamic_batch, parity=parity, proto=final, path=path,
                              extra=extra_manifest)
    data = final.SerializeToString()
    manifest["file_sha256"] = __import__("hashlib").sha256(data).hexdigest()
    manifest["file_bytes"] = len(data)
    write_atomically({path: data, manifest_path: (json.dumps(manifest, indent=2, default=str) + "\n").encode()})
    return ExportResult(path=path, manifest_path=manifest_path, manifest=manifest, parity=parity, model_proto=final)
