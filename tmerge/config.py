"""The merge configuration: one typed value for what to merge and how.

:class:`MergeConfig` holds the method, its :class:`~tmerge.schedule.ScheduleSpec`, proportional
attention, the method's typed options and the adapter of a learned method. It is what
:func:`tmerge.apply`, ``export``, ``train_adapter``, ``run_sweep`` and ``tune`` take, and what the
command line's merge flags (:data:`MERGE_FLAGS`) become. Every value is checked when the config is
made (a one-line TmergeError); only what needs the model (the schedule's caps, bounds that depend on
the depth, the adapter's fit) is checked when it is applied.

The export's merge form (which ops an exported graph merges with) is not part of it: it is an
option of the export (``export(..., merge_form=...)``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .errors import TmergeError
from .merging import MergeMethod, Option, registry
from .schedule import ScheduleSpec, make_spec

SHIPPED = "shipped"  # the adapter tmerge ships for the model's weights; an error where none ships (tmerge.apply's default)
SHIPPED_IF_ANY = "shipped-if-any"  # the shipped adapter where the model has one, else untrained (the CLI without --adapter)
UNTRAINED = "untrained"  # how reports and manifests name an adapter of None (a learned method run untrained)


@dataclass(frozen=True)
class Flag:
    """One command-line flag of a configuration value: its parameter name, option names (as typer
    takes them), type, default and help. The CLI builds its option groups from these."""

    param: str
    names: tuple[str, ...]
    type: Any
    default: Any
    help: str


# the flags MergeConfig.from_cli takes, in the order commands list them
MERGE_FLAGS = (
    Flag("method", ("--method",), str, "tome", "merging method: tome, pitome, dtem, ltm, none"),
    Flag("r", ("--r", "-r"), Optional[int], None, "tokens merged per block (constant)"),
    Flag("inflection", ("--inflection",), Optional[float], None, "with --r: ToMe's linear ramp around r, in [-1, 1]"),
    Flag("schedule", ("--schedule",), Optional[str], None, "explicit per-block r, e.g. 16,16,8"),
    Flag("keep_ratio", ("--keep-ratio",), Optional[float], None, "PiToMe-style: each block keeps this share of its tokens"),
    Flag("prop_attn", ("--prop-attn/--no-prop-attn",), Optional[bool], None, "proportional attention (default: the method's)"),
    Flag("option", ("--option", "-o"), Optional[list[str]], None, "method option KEY=VALUE (see `tmerge methods`); repeatable"),
    Flag("adapter", ("--adapter",), Optional[str], None, "trained DTEM/LTM adapter (.safetensors) from `tmerge train`"),
)


@dataclass(frozen=True)
class MergeConfig:
    """A merging method with its schedule, proportional attention, options and adapter.

    - ``method``: a registered method (``tmerge methods``) or ``"none"`` (the unmodified model);
    - ``schedule``: a :class:`~tmerge.schedule.ScheduleSpec`; None only while none is chosen
      (applying a merging method without one is an error; ``"none"`` takes none);
    - ``prop_attn``: proportional attention; None is the method's default (off for MAE-style weights);
    - ``options``: the method's own options, checked and converted to their types ("0.9" -> 0.9);
    - ``adapter`` (learned methods, DTEM/LTM): a trained adapter file; :data:`SHIPPED` (default) the
      adapter shipped for the model's weights, an error where there is none; :data:`SHIPPED_IF_ANY`
      that adapter where there is one, else untrained (what the CLI does without ``--adapter``);
      None runs the method untrained (it then merges exactly like ToMe). Training-free methods take
      no adapter (it is None for them).

    :meth:`of` builds one from loose values (``MergeConfig.of("tome", r=16)``), :meth:`from_cli` from
    the command line's flags, :meth:`from_manifest` from an export manifest or a report;
    :meth:`as_flags` gives the flags back and :meth:`as_dict` a JSON-ready dict.
    """

    method: str
    schedule: ScheduleSpec | None = None
    prop_attn: bool | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    adapter: str | None = SHIPPED

    def __post_init__(self) -> None:
        options = dict(self.options or {})
        check_option_names(self.method, options)
        if self.method == "none":
            object.__setattr__(self, "prop_attn", None)  # nothing merges: no size to attend with
            if self.schedule is not None:
                given = [name for name, v in (("r", self.schedule.r), ("schedule", self.schedule.per_layer),
                                              ("keep_ratio", self.schedule.keep_ratio)) if v is not None]
                raise TmergeError(f"method 'none' merges nothing: drop {', '.join(given)}")
        else:
            declared = registry.get(self.method).options
            options = {k: _model_free(declared[k]).parse(k, v, self.method, None) for k, v in options.items()}
        object.__setattr__(self, "options", options)
        if self.schedule is not None and not isinstance(self.schedule, ScheduleSpec):
            raise TmergeError(f"schedule must be a ScheduleSpec (see MergeConfig.of), got {self.schedule!r}")
        if self.prop_attn is not None and not isinstance(self.prop_attn, bool):
            raise TmergeError(f"prop_attn must be True, False or None, got {self.prop_attn!r}")
        adapter = os.fspath(self.adapter) if isinstance(self.adapter, os.PathLike) else self.adapter
        if adapter is not None and not isinstance(adapter, str):
            raise TmergeError(f"adapter must be a file path, {SHIPPED!r}, {SHIPPED_IF_ANY!r} or None, got {adapter!r}")
        if not self.learned:
            if adapter not in (None, SHIPPED, SHIPPED_IF_ANY):
                raise TmergeError(f"method {self.method} learns nothing: it takes no adapter")
            adapter = None
        object.__setattr__(self, "adapter", adapter)

    def __hash__(self) -> int:
        return hash((self.method, self.schedule, self.prop_attn, tuple(sorted(self.options.items())), self.adapter))

    # ---- building one ----------------------------------------------------------------------------

    @classmethod
    def of(cls, method: str = "tome", /, *, r: int | None = None, inflection: float | None = None,
           schedule: list[int] | tuple[int, ...] | str | None = None, keep_ratio: float | None = None,
           prop_attn: bool | None = None, adapter: str | os.PathLike | None = SHIPPED, **options: Any) -> MergeConfig:
        """The one constructor from loose values: at most one of ``r`` (with an optional ToMe
        ``inflection`` in [-1, 1]), ``schedule`` (per-block r, a list or "8,8,4") and ``keep_ratio``;
        the method's ``options`` as keywords. ``MergeConfig.of("pitome", keep_ratio=0.9, margin=0.8)``."""
        spec = make_spec(r=r, inflection=inflection, schedule=schedule, keep_ratio=keep_ratio)
        return cls(method, spec, prop_attn, options, adapter)

    @classmethod
    def from_cli(cls, method: str = "tome", r: int | None = None, inflection: float | None = None,
                 schedule: str | None = None, keep_ratio: float | None = None, prop_attn: bool | None = None,
                 option: list[str] | None = None, adapter: str | None = None) -> MergeConfig:
        """The values of the merge flags (:data:`MERGE_FLAGS`; ``-o KEY=VALUE`` items in ``option``)
        as a config. Without ``--adapter`` a learned method loads the adapter shipped for the model's
        weights where there is one, else runs untrained (:data:`SHIPPED_IF_ANY`)."""
        options = parse_key_values(option, "--option")
        check_option_names(method, options)  # before they meet of()'s own keywords
        return cls.of(method, r=r, inflection=inflection, schedule=schedule, keep_ratio=keep_ratio,
                      prop_attn=prop_attn, adapter=SHIPPED_IF_ANY if adapter is None else adapter, **options)

    @classmethod
    def from_manifest(cls, data: Mapping[str, Any]) -> MergeConfig:
        """The configuration an export manifest, a profile report or :meth:`as_dict` records, to
        rebuild the merged model: the schedule as the per-block r that ran (``layers[].r`` of a
        manifest, ``schedule`` of a report) or the spec of :meth:`as_dict`, the recorded options and
        proportional attention, and the adapter that ran (older files: ``adapter_used``)."""
        method = data.get("method")
        if not isinstance(method, str):
            raise TmergeError("the manifest names no merging method")
        if method == "none":
            return cls("none")
        layers = data.get("layers")
        if isinstance(layers, list):  # an export manifest: the per-block r that ran
            spec = ScheduleSpec(per_layer=tuple(int(layer["r"]) for layer in layers))
        elif isinstance(data.get("schedule"), list):  # a profile report (per-block r) or as_dict's explicit schedule
            spec = ScheduleSpec(per_layer=tuple(data["schedule"]))
        else:
            spec = make_spec(r=data.get("r"), inflection=data.get("inflection"), keep_ratio=data.get("keep_ratio"))
        options = data.get("options", data.get("method_options")) or {}
        return cls(method, spec, data.get("prop_attn"), options, _adapter_from_record(upgrade_adapter_keys(data)))

    # ---- reading one -----------------------------------------------------------------------------

    @property
    def learned(self) -> bool:
        """Whether the method has learned parameters (DTEM, LTM): only those take an adapter."""
        return self.method != "none" and registry.get(self.method).trainable_layers is not MergeMethod.trainable_layers

    @property
    def adapter_path(self) -> str | None:
        """The adapter file given, or None (shipped, untrained, or a training-free method)."""
        return None if self.adapter in (None, SHIPPED, SHIPPED_IF_ANY) else self.adapter

    def as_flags(self) -> list[str]:
        """The command-line flags that build this configuration again (``from_cli`` of their values
        equals it). A learned method run untrained (adapter None) has no such flags; :data:`SHIPPED`
        is given as no ``--adapter`` (the CLI then loads the shipped adapter where there is one)."""
        flags = ["--method", self.method]
        spec = self.schedule
        if spec is not None:
            if spec.per_layer is not None:
                flags += ["--schedule", ",".join(str(v) for v in spec.per_layer)]
            elif spec.keep_ratio is not None:
                flags += ["--keep-ratio", repr(spec.keep_ratio)]
            else:
                flags += ["--r", str(spec.r)]
                if spec.inflection is not None:
                    flags += ["--inflection", repr(spec.inflection)]
        if self.prop_attn is not None:
            flags.append("--prop-attn" if self.prop_attn else "--no-prop-attn")
        for key, value in self.options.items():
            flags += ["--option", f"{key}={flag_value(value)}"]
        if self.adapter_path is not None:
            flags += ["--adapter", self.adapter_path]
        elif self.learned and self.adapter is None:
            raise TmergeError(f"{self.method} run untrained (adapter None) has no command-line flags: the CLI "
                              "loads the shipped adapter where the model has one")
        return flags

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``method``, the schedule as ``r`` (+ ``inflection``), ``schedule`` (per-block
        list) or ``keep_ratio``, ``prop_attn``, ``options`` and ``adapter`` (a path, "shipped" or
        "untrained"; left out where nothing is to load). :meth:`from_manifest` reads it back."""
        out: dict[str, Any] = {"method": self.method}
        spec = self.schedule
        if spec is not None:
            if spec.per_layer is not None:
                out["schedule"] = list(spec.per_layer)
            elif spec.keep_ratio is not None:
                out["keep_ratio"] = spec.keep_ratio
            else:
                out["r"] = spec.r
                if spec.inflection is not None:
                    out["inflection"] = spec.inflection
        out["prop_attn"] = self.prop_attn
        if self.options:
            out["options"] = dict(self.options)
        if self.learned and self.adapter != SHIPPED_IF_ANY:
            out["adapter"] = UNTRAINED if self.adapter is None else self.adapter
        return out


def check_option_names(method: str, options: Mapping[str, Any]) -> None:
    """A one-line TmergeError naming the options ``method`` does not declare (and those it does)."""
    if method == "none":
        if options:
            raise TmergeError(f"method 'none' takes no options (got {', '.join(sorted(options))})")
        return
    declared = registry.get(method).options
    unknown = sorted(set(options) - set(declared))
    if unknown:
        known = ", ".join(sorted(declared)) or "none"
        raise TmergeError(f"unknown option(s) for method {method}: {', '.join(unknown)} (known: {known})")


def _model_free(option: Option) -> Option:
    """``option`` as far as it can be checked without the model: one bounded by the model's depth
    is checked for its type here and in full (one message with both bounds) when the method is built."""
    return dataclasses.replace(option, low=None, high=None) if option.high == "depth" else option


def upgrade_adapter_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (a manifest or report) with the adapter under one key, ``adapter``: the adapter that
    ran ({path, sha256, shipped, ...} or "untrained"). Files written before the rename kept it in
    ``adapter_used``, and a manifest's ``adapter`` then held the ``--adapter`` given, as an absolute
    path: that path becomes the record's."""
    data = dict(data)
    if "adapter_used" not in data:
        return data
    used, given = data.pop("adapter_used"), data.pop("adapter", None)
    if isinstance(used, dict) and isinstance(given, str):
        used = {**used, "path": given}
    if used is not None:
        data["adapter"] = used
    return data


def _adapter_from_record(data: Mapping[str, Any]) -> str | None:
    """The config's adapter from what a file records under ``adapter`` (see :meth:`MergeConfig.as_dict`
    and :func:`upgrade_adapter_keys`); nothing recorded: :data:`SHIPPED_IF_ANY`, as the CLI."""
    record = data.get("adapter")
    if record is None:
        return SHIPPED_IF_ANY
    if record == UNTRAINED:
        return None
    if isinstance(record, dict):
        return SHIPPED if record.get("shipped") else str(record["path"])
    return str(record)


def flag_value(value: Any) -> str:
    """A value as ``KEY=VALUE`` flags take it: strings as they are where they read back the same
    (see :func:`parse_key_values`), everything else as JSON."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value
    return json.dumps(value)


def parse_key_values(items: str | list[str] | None, what: str, *, split_commas: bool = False) -> dict[str, Any]:
    """``["margin=0.9", "bsm_layers=6"]`` -> {"margin": 0.9, "bsm_layers": 6} (JSON values, else strings).

    With ``split_commas`` each item may hold several pairs: "img_size=32,patch_size=8".
    """
    if isinstance(items, str):
        items = [items]
    pairs = [p for item in items or [] for p in (item.split(",") if split_commas else [item]) if p.strip()]
    options: dict[str, Any] = {}
    for item in pairs:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TmergeError(f"{what} takes KEY=VALUE, got {item!r}")
        if key.strip() in options:
            raise TmergeError(f"{what} {key.strip()} is given twice")
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw
    return options
