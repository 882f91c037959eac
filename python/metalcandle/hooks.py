"""Experiment hooks: read, change or replace what flows through the decoder, its gradients, the
parameter updates, and add auxiliary losses, from Python or from a run config's `[hooks]`.
Registration goes through `Model._core` here only (`Model.add_*_hook` forward to this module).

Points (`*` in a pattern matches any run of characters, dots included):

- `embed`: token (+ position) embeddings, [B, T, H]
- `layers.N.attn_in`: the normed input of block N's attention, [B, T, H]
- `layers.N.attn_scores`, `layers.N.attn_probs`: [B, heads, T, keys] (scores after the mask)
- `layers.N.attn_out`, `layers.N.mlp_out`: what each branch adds to the residual stream
- `layers.N.residual`: the residual stream after block N
- `final_norm`: the LM head's input; `logits`: [B, T, V]

Four sections of hooks, each with built-in kinds (`describe_kinds()` lists them with their
parameters, from the core's vocabulary):

- forward (`Model.add_forward_hook`): at a point, in the order added; a built-in kind or a Python
  function `fn(point_name, array) -> array | None` (None keeps the value).
- backward (`Model.add_backward_hook`): rewrite the gradient arriving at a point before it flows
  upstream; a built-in kind or `fn(point_name, grad) -> grad`.
- update (`Model.add_update_hook`): transform each trainable parameter's gradient between the
  backward pass and the optimizer (before global-norm clipping), for the parameters whose names a
  pattern matches; a built-in kind or `fn(name, param, grad) -> grad`.
- auxiliary losses (`Model.add_aux_loss`): "activation_l2" (mean square at a point), "z_loss"
  (mean squared logsumexp of the logits at the label positions), "attention_entropy" (mean
  entropy of attention rows). The training objective is the main loss plus each weighted
  auxiliary loss; `Trainer.step(...).aux` reports each one unweighted and `.loss` stays the main
  loss alone.

Gradients through a Python replacement: a forward function runs on plain arrays, outside the
autograd graph, so during training its replacement `f(x)` enters the graph straight-through,
`y = x + (f(x) - x).detach()`: the forward sees `f(x)` and the gradient passes as if `f` were the
identity. The built-in kinds other than "patch" are differentiated exactly; a "patch" passes no
gradient upstream unless a "straight_through" backward hook sits at the same point.

Hooks cost nothing when none is attached: each point is one branch, and its name is never even
formatted. Python functions are called with the array values copied out of the model; change
what flows by returning a new array, not by writing into the one passed in. An exception raised
inside a hook function surfaces as a RuntimeError naming the point and the original error (its
`__cause__`); an array returned in the wrong shape is a ValueError naming the point and both
shapes, at every point and in the backward alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metalcandle import _core
from metalcandle.errors import UserError, did_you_mean

# The vocabulary is the core's (`metalcandle_core::hooks::vocab`): the points, and per section its
# kinds, where each applies, and its parameters with their types, defaults and bounds. Everything
# below reads it; nothing here decides by the name of a kind.
VOCABULARY: dict = _core.hook_vocabulary()
SECTIONS = tuple(s["key"] for s in VOCABULARY["sections"])
_POINTS = VOCABULARY["points"]
_NO_DEFAULT = object()


@dataclass(frozen=True)
class _Param:
    """A hook parameter: "number", "int", "bool" or "ints" (a list of integers >= 0)."""

    kind: str
    default: Any = _NO_DEFAULT  # None: optional, and left out when not given
    min: float | None = None
    min_exclusive: bool = False

    @classmethod
    def of(cls, p: dict) -> _Param:
        default = _NO_DEFAULT if p["required"] else p["default"]
        return cls(p["type"], default, p["min"], p["min_exclusive"])


@dataclass(frozen=True)
class _Kind:
    """A built-in kind of one section, as the vocabulary describes it."""

    name: str
    target: str | None  # "point", "pattern", or None (z_loss reads the logits)
    target_default: str | None  # None: the point or pattern must be given
    takes: str  # "params", "function" (a Python callable) or "array" (patch)
    params: dict[str, _Param]
    range: tuple[str, str] | None  # at least one given, the first <= the second
    at: tuple[str, ...]  # the points (last part) it can sit at; empty: any
    python_only: str | None  # why a run config cannot name it

    @classmethod
    def of(cls, k: dict) -> _Kind:
        params = {p["name"]: _Param.of(p) for p in k["params"]}
        rng = tuple(k["range"]) if k["range"] else None
        return cls(k["name"], k["target"], k["target_default"], k["takes"], params, rng, tuple(k["at"]),
                   k["python_only"])  # fmt: skip


# Section -> kind name -> its description, in the vocabulary's order.
KINDS: dict[str, dict[str, _Kind]] = {
    s["key"]: {k["name"]: _Kind.of(k) for k in s["kinds"]} for s in VOCABULARY["sections"]
}
_LABEL = {s["key"]: s["label"] for s in VOCABULARY["sections"]}


def _function_kind(section: str) -> str | None:
    """The name of the kind that runs a Python function in `section`, if it has one."""
    return next((n for n, k in KINDS[section].items() if k.takes == "function"), None)


def describe_kinds() -> str:
    """The built-in kinds of each section with their parameters, and which a run config cannot
    name ("Python only"), as the README lists them."""
    lines = []
    for section, kinds in KINDS.items():
        # Where a kind applies is shown only in a section whose kinds differ in it.
        uniform = len({(k.target, k.target_default) for k in kinds.values()}) == 1
        items = ["a function"] if _function_kind(section) else []
        for name, k in kinds.items():
            if k.takes == "function":
                continue
            params = ["array="] if k.takes == "array" else []
            for pname, p in k.params.items():
                if p.default is _NO_DEFAULT:
                    params.append(pname)
                elif p.default is None:
                    params.append(f"{pname}?")
                else:
                    params.append(f"{pname}={json.dumps(p.default)}")
            if not uniform and k.target is not None:
                default = "" if k.target_default is None else f"={json.dumps(k.target_default)}"
                params.append(f"{k.target}{default}")
            notes = ", ".join(params) + ("; Python only" if k.python_only else "")
            items.append(f'"{name}"' + (f" ({notes.lstrip('; ')})" if notes else ""))
        lines.append(f"- {section}: {', '.join(items)}")
    return "\n".join(lines)


def _quoted(names) -> str:
    return ", ".join(f'"{n}"' for n in names)


def check_entry(section: str, entry: dict, at: str | None = None) -> dict:
    """One hook description (`kind`, `point` or `pattern`, parameters) checked against the kinds
    of `section` and completed with its defaults. `at` names it in a config ("hooks.forward[0]");
    without it the messages speak of keyword arguments. Raises ValueError with a one-line message."""
    kinds = KINDS[section]
    kind = entry.get("kind")
    if at is not None:
        if isinstance(kind, str) and kind in kinds and kinds[kind].python_only:
            why = kinds[kind].python_only.format(section=section)
            raise ValueError(f'{at}.kind = "{kind}" is only available from Python ({why})')
        in_config = [n for n, k in kinds.items() if not k.python_only]
        if kind is None:
            raise ValueError(f'{at} needs kind = "..." (one of {_quoted(in_config)})')
        if not isinstance(kind, str) or kind not in in_config:
            raise ValueError(
                f"{at}.kind must be one of {_quoted(in_config)}, got {kind!r}"
                f"{did_you_mean(str(kind), in_config)}"
            )
    function = _function_kind(section)
    if not isinstance(kind, str) or kind not in kinds or kind == function:
        known = [n for n in kinds if n != function]
        raise ValueError(
            f"unknown {_LABEL[section]} kind {kind!r}{did_you_mean(str(kind), known)} "
            f"(kinds: {', '.join(known)}{'; or pass a function' if function else ''})"
        )
    k = kinds[kind]
    label = f'{_LABEL[section]} "{kind}": '
    name = (lambda key: f"{at}.{key}") if at is not None else (lambda key: f"{label}{key}")
    out = {"kind": kind}

    # Where the hook applies.
    if k.target is None:
        if entry.get("point") is not None:
            raise ValueError(
                f"{at + '.point: ' if at else ''}{kind} takes no point (it is computed on the logits)"
            )
    elif k.target == "point" and k.target_default is None:
        point = entry.get("point")
        if not isinstance(point, str) or not point:
            where = f"{at} needs point = " if at is not None else f"{label}needs point="
            raise ValueError(
                f'{where}"..." (a named point like "layers.0.mlp_out" or a glob like '
                f'"layers.*.mlp_out"), got {point!r}'
            )
        out["point"] = point
    elif k.target == "point":
        point = entry.get("point", k.target_default)
        if not isinstance(point, str) or not point:
            raise ValueError(f"{name('point')} must be a point name or glob, got {point!r}")
        out["point"] = point
    else:
        pattern = entry.get("pattern", k.target_default)
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(
                f'{name("pattern")} must be a parameter name or glob like "model.layers.0.*", got {pattern!r}'
            )
        out["pattern"] = pattern

    params = k.params
    for key in entry:
        if key in out or key in params:
            continue
        takes = ", ".join(params) or "no parameters"
        if at is not None:
            raise ValueError(f"unknown key '{at}.{key}'{did_you_mean(key, params)} ({kind} takes {takes})")
        raise ValueError(f"{label}unknown parameter {key!r}{did_you_mean(key, params)} (it takes {takes})")
    for key, p in params.items():
        if key in entry:
            out[key] = _check_param(name(key), p, entry[key])
        elif p.default is _NO_DEFAULT:
            raise ValueError(
                f"missing required key '{at}.{key}'" if at is not None else f"{label}needs {key}="
            )
        elif p.default is not None:
            out[key] = p.default
    if k.range:
        lo_key, hi_key = k.range
        lo, hi = out.get(lo_key), out.get(hi_key)
        if lo is None and hi is None:
            raise ValueError(f"{at + ' ' if at else label}{kind} needs {lo_key}, {hi_key} or both")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"{name(lo_key)} ({lo}) must be <= {hi_key} ({hi})")
    return out


def _check_param(dotted: str, p: _Param, value: Any) -> Any:
    def bad(expected: str):
        raise ValueError(f"{dotted} must be {expected}, got {value!r}")

    if p.kind == "bool":
        if not isinstance(value, bool):
            bad("true or false")
        return value
    if p.kind == "ints":
        if not isinstance(value, list | tuple) or not value:
            bad("a non-empty list of integers")
        if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 0 for v in value):
            bad("a non-empty list of integers >= 0")
        return [int(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        bad("an integer" if p.kind == "int" else "a number")
    if p.kind == "int" and not isinstance(value, int | np.integer):
        bad("an integer")
    if not np.isfinite(value):
        bad("a finite number")
    # Plain Python numbers, for the JSON the core reads.
    value = int(value) if isinstance(value, int | np.integer) else float(value)
    if p.min is not None and (value <= p.min if p.min_exclusive else value < p.min):
        what = "an integer" if p.kind == "int" else "a number"
        bad(f"{what} {'>' if p.min_exclusive else '>='} {p.min:g}")
    return value


# Points ---------------------------------------------------------------------------------------


# The core's point names and pattern matching, so that Python checks agree with it exactly.
point_names = _core.hook_points
glob_match = _core.glob_match


def matching_points(model, pattern: str) -> list[str]:
    """The points of `model` that `pattern` matches; a ValueError naming the pattern if none."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"a hook point must be a non-empty string, got {pattern!r}")
    names = point_names(model.num_layers)
    found = [p for p in names if glob_match(pattern, p)]
    if not found:
        raise ValueError(
            f'hook point "{pattern}" matches no point of this model{did_you_mean(pattern, names)} '
            f"(points: {', '.join(_POINTS['before'])}, layers.N.{{{','.join(_POINTS['in_a_layer'])}}} "
            f"for N < {model.num_layers}, {', '.join(_POINTS['after'])})"
        )
    return found


def _check_points_fit(model, k: _Kind, pattern: str, points: list[str], heads=None) -> None:
    """Refuses a kind at points it cannot sit at (`k.at`), and heads (an "ablate_heads" list) past a
    layer's count. The core finds these out only in the middle of a forward; here they fail when
    attached. `points`: what `pattern` matches (`matching_points`)."""
    kind, wanted = k.name, k.at
    if not wanted:
        return
    other = [p for p in points if p.rsplit(".", 1)[-1] not in wanted]
    if other:
        raise ValueError(
            f'{kind} at "{pattern}" needs {" or ".join(wanted)} points ([batch, heads, T, keys]), '
            f'and "{other[0]}" is not one'
        )
    if heads:
        layers = model.spec["layers"]
        for p in points:
            n = layers[int(p.split(".")[1])]["attention"]["num_heads"]
            if max(heads) >= n:
                raise ValueError(f'{kind} at "{p}": head {max(heads)} out of range (the layer has {n} heads)')


def _trainable_names(model) -> list[str]:
    # With an adapter only its matrices train; reading them is cheap. Without one every parameter
    # trains, and their names come without copying any weights.
    if model.has_adapter:
        return list(model.trainable_parameters())
    return model.parameter_names()


# Handles --------------------------------------------------------------------------------------


class HookHandle:
    """An attached hook. `remove()` detaches it (True the first time); as a context manager it
    detaches on exit: `with model.add_forward_hook("logits", fn): ...`."""

    def __init__(self, model, hook_id: int, what: str):
        self._model = model
        self.id = int(hook_id)
        self.what = what
        self._removed = False

    def remove(self) -> bool:
        if self._removed:
            return False
        self._removed = True
        return bool(self._model._core.remove_hook(self.id))

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = ", removed" if self._removed else ""
        return f"HookHandle(id={self.id}, {self.what}{state})"


def _float32(value) -> np.ndarray:
    # The core takes float32 only; numpy promotes to float64 easily (a float64 scalar, np.mean).
    return np.asarray(value, dtype=np.float32)


def _point_fn(fn: Callable) -> Callable:
    """A forward or backward hook function, `fn(point, array)`, whose result the core reads as
    float32 (None keeps the value; the core checks the shape)."""

    def call(point, x):
        out = fn(point, x)
        return None if out is None else _float32(out)

    return call


def _update_fn(fn: Callable) -> Callable:
    def call(name, param, grad):
        out = fn(name, param, grad)
        return None if out is None else _float32(out)

    return call


def _params(spec: dict) -> dict:
    """A checked entry's parameters, without where it applies and its kind."""
    return {k: v for k, v in spec.items() if k not in ("kind", "point", "pattern")}


def add_forward_hook(model, point: str, fn_or_kind, array=None, **params) -> HookHandle:
    """See `Model.add_forward_hook`."""
    points = matching_points(model, point)
    takes_array = [n for n, k in KINDS["forward"].items() if k.takes == "array"]
    if not callable(fn_or_kind) and fn_or_kind in takes_array:
        kind = fn_or_kind
        if params:
            raise ValueError(f'forward hook "{kind}" takes only array=, got {", ".join(params)}')
        if array is None:
            raise ValueError(
                f'forward hook "{kind}" needs array= (the activation to patch in, of the point\'s shape)'
            )
        patch = np.ascontiguousarray(array, dtype=np.float32)
        hook_id = model._core.add_forward_hook(point, kind, {}, None, patch)
        return HookHandle(model, hook_id, f'forward "{kind}" at "{point}"')
    if array is not None:
        if callable(fn_or_kind):
            raise ValueError("a forward hook function takes no parameters; close over them instead")
        raise ValueError(f"array= is for the {_quoted(takes_array)} kind, not {fn_or_kind!r}")
    return _add_hook(model, "forward", point, points, fn_or_kind, params, _point_fn)


def add_backward_hook(model, point: str, fn_or_kind, **params) -> HookHandle:
    """See `Model.add_backward_hook`."""
    points = matching_points(model, point)
    return _add_hook(model, "backward", point, points, fn_or_kind, params, _point_fn)


def add_update_hook(model, pattern: str, fn_or_kind, **params) -> HookHandle:
    """See `Model.add_update_hook`."""
    _check_update_pattern(model, pattern)
    return _add_hook(model, "update", pattern, None, fn_or_kind, params, _update_fn)


def _check_update_pattern(model, pattern: str) -> None:
    names = _trainable_names(model)
    if not isinstance(pattern, str) or not any(glob_match(pattern, n) for n in names):
        hint = "; attach the LoRA adapter first" if "lora" in str(pattern) and not model.has_adapter else ""
        raise ValueError(
            f"update hook pattern {pattern!r} matches no trainable parameter"
            f"{did_you_mean(str(pattern), names)} (names look like {names[0]!r}{hint})"
        )


# Names a built-in kind's parameters can never take: the entry's own keys.
_ENTRY_KEYS = ("kind", "point", "pattern")


def _add_hook(
    model, section: str, where: str, points: list[str] | None, fn_or_kind, params: dict, wrap: Callable
) -> HookHandle:
    """Attaches a forward, backward or update hook, a function or a built-in kind with its keyword
    `params` (checked here), at `where` (a point, or for update hooks a parameter pattern) that the
    caller has already checked against the model; `points`: what the point matches."""
    key = "pattern" if section == "update" else "point"
    reserved = [k for k in _ENTRY_KEYS if k in params]
    if reserved:
        names = ", ".join(k + "=" for k in reserved)
        verb = "is not a parameter" if len(reserved) == 1 else "are not parameters"
        raise ValueError(
            f"{_LABEL[section]}: {names} {verb} (the {key} and the kind are the first two "
            f"arguments: model.add_{section}_hook({key}, kind, ...))"
        )
    place = f"on {where!r}" if section == "update" else f'at "{where}"'
    if callable(fn_or_kind):
        if params:
            article = "an" if section == "update" else "a"
            raise ValueError(
                f"{article} {_LABEL[section]} function takes no parameters; close over them instead"
            )
        function = _function_kind(section)
        hook_id = getattr(model._core, f"add_{section}_hook")(where, function, {}, wrap(fn_or_kind))
        return HookHandle(model, hook_id, f"{section} {_name_of(fn_or_kind)} {place}")
    if fn_or_kind == _function_kind(section):
        raise ValueError(f"pass the function itself: model.add_{section}_hook({key}, fn)")
    return _attach(model, section, check_entry(section, {"kind": fn_or_kind, key: where, **params}), points)


def _attach(model, section: str, spec: dict, points: list[str] | None) -> HookHandle:
    """Attaches a built-in forward, backward or update hook from its checked entry (`check_entry`'s
    output), whose point or pattern the caller has checked against the model (`points`: what the
    point matches; None for an update hook)."""
    kind = spec["kind"]
    if section == "update":
        where, place = spec["pattern"], f"on {spec['pattern']!r}"
    else:
        where, place = spec["point"], f'at "{spec["point"]}"'
    if points is not None:
        _check_points_fit(model, KINDS[section][kind], where, points, spec.get("heads"))
    hook_id = getattr(model._core, f"add_{section}_hook")(where, kind, _params(spec))
    return HookHandle(model, hook_id, f'{section} "{kind}" {place}')


def add_aux_loss(model, kind: str, weight: float, point: str | None = None) -> HookHandle:
    """See `Model.add_aux_loss`."""
    entry = {"kind": kind, "weight": weight}
    if point is not None:
        entry["point"] = point
    return _attach_aux_loss(model, check_entry("aux_loss", entry))


def _attach_aux_loss(model, spec: dict) -> HookHandle:
    """Attaches an auxiliary loss from its checked entry, after checking its point against the model."""
    kind, point = spec["kind"], spec.get("point")
    if point is not None:
        points = matching_points(model, point)
        _check_points_fit(model, KINDS["aux_loss"][kind], point, points)
    hook_id = model._core.add_aux_loss(kind, float(spec["weight"]), point)
    where = f' at "{point}"' if point is not None else ""
    return HookHandle(model, hook_id, f'aux loss "{kind}"{where}, weight {spec["weight"]}')


def _name_of(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


# Captures -------------------------------------------------------------------------------------


def _drain(model) -> None:
    """Moves what the core captured to the open captures that asked for it; the rest waits for
    `Model.take_captured`."""
    for hook_id, point, value in model._core.take_captured():
        owner = next((c for c in model._captures if c._owns(hook_id)), None)
        target = model._captured if owner is None else owner._data
        target[point] = value


def take_captured(model) -> dict:
    """See `Model.take_captured`."""
    _drain(model)
    out, model._captured = model._captured, {}
    return out


class Capture(Mapping):
    """The values at some points during the forwards of a `with` block: `cap[point]` is the latest
    forward's value there, an array (`full=True`) or a dict of statistics (shape, mean, std, min,
    max, absmax). Keys are point names; a glob in the request gives one key per matching point."""

    def __init__(self, model, points, full: bool = True):
        if isinstance(points, str):
            points = [points]
        if not isinstance(full, bool):
            raise ValueError(f"capture: full must be true or false, got {full!r}")
        self._model = model
        self._patterns = list(points)
        if not self._patterns:
            raise ValueError("capture needs at least one point")
        for p in self._patterns:
            matching_points(model, p)
        self._full = full
        self._data: dict[str, Any] = {}
        self._handles: list[HookHandle] = []

    def _owns(self, hook_id: int) -> bool:
        return any(h.id == hook_id for h in self._handles)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> Capture:
        if self.active:
            raise RuntimeError("this capture is already open")
        _drain(self._model)  # values from before the block belong to whoever captured them
        try:
            for p in self._patterns:
                self._handles.append(add_forward_hook(self._model, p, "capture", full=self._full))
        except BaseException:
            self._close()
            raise
        self._model._captures.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _drain(self._model)
        self._close()

    def _close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        # By identity: a Mapping's == compares the captured arrays.
        self._model._captures = [c for c in self._model._captures if c is not self]

    def _sync(self) -> None:
        if self.active:
            _drain(self._model)

    def __getitem__(self, point: str):
        self._sync()
        if point not in self._data:
            got = ", ".join(self._data) or "nothing yet (run a forward inside the with block)"
            raise KeyError(f"no value captured at {point!r}; captured: {got}")
        return self._data[point]

    def __iter__(self) -> Iterator[str]:
        self._sync()
        return iter(list(self._data))

    def __len__(self) -> int:
        self._sync()
        return len(self._data)

    def __repr__(self) -> str:
        shapes = {k: v["shape"] if isinstance(v, dict) else v.shape for k, v in self.items()}
        return f"Capture(shapes={shapes})"


# Config ---------------------------------------------------------------------------------------


def attach_hooks(model, hooks_cfg: dict | None, source: str | Path | None = None) -> list[HookHandle]:
    """Attaches the hooks of a validated run config's `[hooks]` section (`Config["hooks"]`: per
    section, the entries that `config.validate` checked and completed with `check_entry`) to
    `model`. Only what depends on the model is checked here, the points and parameter patterns: a
    UserError naming the entry (`hooks.forward[0]: ...`) for any that does not fit it."""
    where = f"{source}: " if source else ""
    handles = []
    for section in SECTIONS:
        for i, spec in enumerate((hooks_cfg or {}).get(section) or []):
            try:
                if section == "aux_loss":
                    h = _attach_aux_loss(model, spec)
                elif section == "update":
                    _check_update_pattern(model, spec["pattern"])
                    h = _attach(model, section, spec, None)
                else:
                    h = _attach(model, section, spec, matching_points(model, spec["point"]))
            except ValueError as e:
                raise UserError(f"{where}hooks.{section}[{i}]: {e}") from None
            handles.append(h)
    return handles


__all__ = ["Capture", "HookHandle", "attach_hooks", "describe_kinds", "point_names"]
