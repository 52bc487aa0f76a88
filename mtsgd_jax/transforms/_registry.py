"""The transformations by name, and specs: a name with its options in one string.

A *spec* is ``NAME`` or ``NAME:key=value,key=value,...``, e.g.
``"mtsgd:weighting=score,solver=enumerate"``. ``NAME`` is a key of
:data:`TRANSFORMS`; each key is a keyword option of that transformation's
factory, and its value is converted by the type of the option's default
(``bool``: ``1/0``, ``true/false``, ``yes/no``, ``on/off``; ``int``;
``float``; ``str``), or by the annotation where the default is ``None``
(``block_size: int | None``); ``none`` gives ``None`` to an option that
accepts it. Options whose values are not scalars (``kernel``, ``features``,
``solver_options``, ``preferences``, ``weights``) are passed to
:func:`make_transform` as keyword arguments instead.

Applications add their own options to a spec with ``extra_options=`` of
:func:`parse_spec` (an experiment's temperature, a trainer's loss weights);
they come back apart from the factory's options, in
:attr:`TransformSpec.extras`.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any, Callable, Collection, Mapping, NamedTuple

import optax

from mtsgd_jax import qp as _qp
from mtsgd_jax.transforms._mgda import mgda
from mtsgd_jax.transforms._moo_svgd import moo_svgd
from mtsgd_jax.transforms._mtsgd import WEIGHTINGS, mtsgd, svgd
from mtsgd_jax.transforms._pareto_mtl import pareto_mtl
from mtsgd_jax.transforms._scalarization import linear_scalarization

__all__ = ["TRANSFORMS", "TransformSpec", "format_spec", "make_transform", "parse_spec", "transform_options"]

TRANSFORMS: Mapping[str, Callable[..., optax.GradientTransformationExtraArgs]] = types.MappingProxyType(
    {
        "mtsgd": mtsgd,
        "svgd": svgd,
        "moo_svgd": moo_svgd,
        "mgda": mgda,
        "linear_scalarization": linear_scalarization,
        "pareto_mtl": pareto_mtl,
    }
)
"""Name -> factory of every multi-target transformation (read-only)."""

# Factories whose first positional parameter is not ``num_targets`` (SVGD is MT-SGD with K = 1).
_SINGLE_TARGET = ("svgd",)

# Values a string option may take, whichever factory has it (checked while parsing, so that a
# command line fails before anything is computed).
_CHOICES = {
    "weighting": WEIGHTINGS,
    "solver": ("auto",) + tuple(_qp.SOLVERS),
}

_SCALARS = (bool, int, float, str)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class TransformSpec(NamedTuple):
    """A parsed spec (see :func:`parse_spec`).

    Attributes:
      name: a key of :data:`TRANSFORMS`.
      options: the factory's keyword options given in the spec, converted
        (e.g. ``{"weighting": "score"}``).
      extras: the application's options given in the spec (those named by
        ``extra_options=`` of :func:`parse_spec`), converted; :func:`make_transform`
        does not use them.
    """

    name: str
    options: dict
    extras: dict


def _check_name(name, where: str, methods: Collection[str] | None = None) -> None:
    valid = tuple(TRANSFORMS) if methods is None else tuple(methods)
    if not isinstance(name, str) or name not in valid:
        raise ValueError(f"{where}: unknown method {name!r}; choose one of {valid}.")


def transform_options(name: str) -> dict[str, Any]:
    """Every keyword option of the factory ``TRANSFORMS[name]``, with its default.

    ``num_targets`` is not an option (it is :func:`make_transform`'s second argument).

    Example:
      >>> transform_options("mgda")
      {'solver': 'auto', 'solver_options': None, 'normalize_grads': False, 'warm_start': True}
    """
    _check_name(name, "transform_options")
    params = list(inspect.signature(TRANSFORMS[name]).parameters.values())
    if name not in _SINGLE_TARGET:
        params = params[1:]  # num_targets
    return {p.name: (None if p.default is inspect.Parameter.empty else p.default) for p in params}


def _option_types(name: str) -> dict[str, tuple[type | None, bool]]:
    """option -> (scalar type or None if the option is not a scalar, whether ``None`` is allowed)."""
    try:
        hints = typing.get_type_hints(TRANSFORMS[name])
    except (NameError, TypeError):  # an annotation that cannot be evaluated: fall back on the defaults
        hints = {}
    out = {}
    for key, default in transform_options(name).items():
        hint = hints.get(key)
        args = typing.get_args(hint) if hint is not None else ()
        allows_none = default is None or type(None) in args
        if default is not None:
            kind = type(default) if type(default) in _SCALARS else None
        else:
            scalars = [a for a in args if a in _SCALARS]
            others = [a for a in args if a not in _SCALARS and a is not type(None)]
            kind = scalars[0] if len(scalars) == 1 and not others else (hint if hint in _SCALARS else None)
        out[key] = (kind, allows_none)
    return out


def _convert(text: str, kind: type, allows_none: bool):
    """``text`` as a ``kind`` (bool / int / float / str), or None; ValueError naming what is expected."""
    low = text.lower()
    if allows_none and low == "none":
        return None
    none = " or none" if allows_none else ""
    if kind is bool:
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"expected a bool ({'/'.join(_TRUE)} or {'/'.join(_FALSE)}){none}, got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an int{none}, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number{none}, got {text!r}") from None
    return text


def _split(spec: str) -> tuple[str, list[tuple[str, str]]]:
    if not isinstance(spec, str):
        raise TypeError(f"parse_spec: spec must be a str like 'mtsgd:weighting=score', got {type(spec).__name__}.")
    name, _, rest = spec.strip().partition(":")
    items = []
    for item in (s.strip() for s in rest.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(
                f"spec {spec!r}: {item!r} is not key=value; write NAME or NAME:key=value,... "
                "(e.g. 'mtsgd:weighting=score')."
            )
        items.append((key.strip(), value.strip()))
    return name.strip(), items


def parse_spec(
    spec: str,
    *,
    methods: Collection[str] | None = None,
    options: Collection[str] | None = None,
    extra_options: Mapping[str, type | Callable[[str], Any]] | None = None,
) -> TransformSpec:
    """Parse ``NAME`` or ``NAME:key=value,...`` into a :class:`TransformSpec`.

    Args:
      spec: the spec string (surrounding white space ignored).
      methods: the names accepted (default: every key of :data:`TRANSFORMS`); an
        application that supports only some of them names those.
      options: the factory options a spec may set (default: every scalar
        option of the named factory); others are refused as unknown.
      extra_options: the application's own options: name -> ``bool``, ``int``,
        ``float`` or ``str`` (converted like the factory's options), or a
        function ``str -> value`` raising ``ValueError`` for a bad value. They
        must not shadow an option of the factory.

    Returns:
      ``TransformSpec(name, options, extras)``; ``options`` can be given to
      :func:`make_transform` (or the spec itself can).

    Raises:
      ValueError: for an unknown method, an item that is not ``key=value``, an
        option given twice, an unknown option (the message lists the valid
        ones), an option that cannot be written in a spec (pass it to
        :func:`make_transform`), or a value of the wrong type or outside the
        option's choices.

    Example:
      >>> parse_spec("mtsgd:weighting=score,warm_start=0,block_size=256")
      TransformSpec(name='mtsgd', options={'weighting': 'score', 'warm_start': False, 'block_size': 256}, extras={})
      >>> parse_spec("mgda:normalize_grads=1,T=0.1", extra_options={"T": float}).extras
      {'T': 0.1}
    """
    name, items = _split(spec)
    _check_name(name, f"spec {spec!r}", methods)
    types_ = _option_types(name)
    if options is not None:
        types_ = {k: v for k, v in types_.items() if k in options}
    extra = dict(extra_options or {})
    shadow = sorted(set(extra) & set(types_))
    if shadow:
        raise ValueError(f"parse_spec: extra_options {shadow} shadow options of {name}; give them other names.")
    valid = [k for k, (kind, _) in types_.items() if kind is not None] + list(extra)
    parsed: dict = {}
    extras: dict = {}
    for key, text in items:
        if key in parsed or key in extras:
            raise ValueError(f"spec {spec!r}: option {key!r} is given twice.")
        if key in extra:
            conv = extra[key]
            try:
                extras[key] = _convert(text, conv, False) if conv in _SCALARS else conv(text)
            except ValueError as err:
                raise ValueError(f"spec {spec!r}: option {key!r}: {err}.") from None
            continue
        if key not in types_:
            objects = [k for k in types_ if k not in valid]
            also = f" (not settable in a spec, only as keyword arguments: {', '.join(objects)})" if objects else ""
            raise ValueError(
                f"spec {spec!r}: unknown option {key!r} for {name}; valid options: {', '.join(valid) or 'none'}{also}."
            )
        kind, allows_none = types_[key]
        if kind is None:
            raise ValueError(
                f"spec {spec!r}: option {key!r} of {name} takes an object, not text; "
                f"pass it as make_transform({name!r}, num_targets, {key}=...)."
            )
        try:
            value = _convert(text, kind, allows_none)
        except ValueError as err:
            raise ValueError(f"spec {spec!r}: option {key!r} of {name}: {err}.") from None
        choices = _CHOICES.get(key)
        if choices is not None and value is not None and value not in choices:
            raise ValueError(f"spec {spec!r}: option {key!r} of {name} must be one of {choices}, got {value!r}.")
        parsed[key] = value
    return TransformSpec(name, parsed, extras)


def format_spec(name: str, options: Mapping[str, Any] | None = None) -> str:
    """The spec string of ``name`` with scalar ``options``; :func:`parse_spec` reads it back.

    Example:
      >>> format_spec("moo_svgd", {"repulsion": 0.5, "normalize_grads": True})
      'moo_svgd:repulsion=0.5,normalize_grads=true'
    """
    _check_name(name, "format_spec")
    items = []
    for key, value in (options or {}).items():
        if value is None:
            text = "none"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float, str)):
            text = repr(value) if isinstance(value, float) else str(value)
        else:
            raise ValueError(f"format_spec: option {key!r} is not a scalar ({type(value).__name__}); it has no spec form.")
        if isinstance(value, str) and any(c in text for c in ",=:") or text != text.strip():
            raise ValueError(f"format_spec: option {key!r}: {value!r} cannot be written in a spec (',', '=', ':' or edge spaces).")
        items.append(f"{key}={text}")
    return name + (":" + ",".join(items) if items else "")


def make_transform(spec: str | TransformSpec, num_targets: int, /, **overrides) -> optax.GradientTransformationExtraArgs:
    """Build the transformation a spec names, for ``num_targets`` targets.

    Args:
      spec: a spec string (``"mtsgd:weighting=score"``, see :func:`parse_spec`)
        or a :class:`TransformSpec` (its ``extras`` are not used).
      num_targets: K, the number of targets (the size of the gradients' axis
        0). ``"svgd"`` takes exactly one target.
      **overrides: keyword options of the factory, as Python values (any
        option, including ``kernel=``, ``features=``, ``solver_options=``,
        ``preferences=``, ``weights=``); they take precedence over the spec's.

    Returns:
      ``TRANSFORMS[name](num_targets, **options, **overrides)``: the same
      ``optax.GradientTransformationExtraArgs`` as calling the factory directly.

    Raises:
      ValueError: as :func:`parse_spec`, for an override that is not an option
        of the factory (the message lists the valid ones), for ``"svgd"`` with
        ``num_targets != 1``, and whatever the factory raises for the values.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtsgd_jax.kernels import rbf
      >>> t = make_transform("mtsgd:weighting=score", 2, kernel=rbf(0.5))
      >>> opt = optax.chain(t, optax.sgd(0.1))
      >>> x = jax.random.normal(jax.random.key(0), (20, 2))      # leaves (M, d)
      >>> grads = jnp.stack([x - 1.0, x + 1.0])                   # (K, M, d)
      >>> updates, state = opt.update(grads, opt.init(x), x)
      >>> updates.shape
      (20, 2)
    """
    if isinstance(spec, TransformSpec):
        _check_name(spec.name, "make_transform")
        name, options = spec.name, dict(spec.options)
    else:
        parsed = parse_spec(spec)
        name, options = parsed.name, parsed.options
    valid = transform_options(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"make_transform: {name} has no option(s) {unknown}; valid options: {', '.join(valid)}.")
    options.update(overrides)
    factory = TRANSFORMS[name]
    if name in _SINGLE_TARGET:
        if isinstance(num_targets, bool) or num_targets != 1:
            raise ValueError(f"make_transform: {name} samples one target (num_targets=1), got {num_targets!r}; use 'mtsgd' for K targets.")
        return factory(**options)
    return factory(num_targets, **options)
