"""``Int8Weight``: a Linear weight held as int8 with one scale per output row (imports torch).

This is the form int8 weights take once loaded: what torchao's ``Int8WeightOnlyConfig``
computes (symmetric, per row), held in two plain tensors, so that a warm start maps them from
the cache without importing torchao (whose import alone costs about 80 MB of RSS and two
seconds). ``F.linear`` computes exactly what torchao's weight-only int8 path computes::

    y = (x @ qdata.T.to(x.dtype)) * scale + bias

The weight behaves as a read-only tensor of its original shape and dtype: ``.to(dtype)``
changes only the dtype it computes in (so Linear subclasses that call
``self.weight.to(x.dtype)``, like Whisper's, work); other operations see the dequantized
values; in-place operations raise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

__all__ = ["Int8Weight"]

aten = torch.ops.aten
_ALIASES = {aten.detach.default, aten.alias.default}
_ALIAS_METHODS = {torch.Tensor.detach, torch.Tensor.view_as}
_INPLACE = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__imatmul__"}
_METADATA = {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.ndimension,
    torch.Tensor.numel,
    torch.Tensor.nelement,
    torch.Tensor.element_size,
    torch.Tensor.stride,
    torch.Tensor.is_floating_point,
    torch.Tensor.is_complex,
    torch.Tensor.is_contiguous,
    torch.Tensor.get_device,
    torch.Tensor.requires_grad_,
    torch.Tensor.__len__,
    torch.Tensor.__repr__,
    torch.Tensor.__format__,
    torch.Tensor.__hash__,
    torch.Tensor.__reduce_ex__,
}


class Int8Weight(torch.Tensor):
    """A weight of shape ``(out, in)`` stored as ``qdata`` (int8) times ``scale`` (``(out, 1)``)."""

    qdata: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
        return torch.Tensor._make_wrapper_subclass(
            cls, qdata.shape, dtype=dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        if qdata.dtype != torch.int8 or qdata.dim() != 2 or scale.shape != (qdata.shape[0], 1):
            raise ValueError(
                f"Int8Weight needs 2-d int8 data and one scale per row, got {qdata.dtype} "
                f"{tuple(qdata.shape)} and scale {tuple(scale.shape)}"
            )
        self.qdata = qdata
        self.scale = scale

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight these int8 values stand for."""
        dtype = dtype or self.dtype
        return self.qdata.to(dtype) * self.scale.to(dtype)

    def _with(self, **change: Any) -> Int8Weight:
        parts = {"qdata": self.qdata, "scale": self.scale, "dtype": self.dtype, **change}
        return Int8Weight(parts["qdata"], parts["scale"], parts["dtype"])

    # torch.compile and torch.save see the two inner tensors
    def __tensor_flatten__(self) -> tuple[list[str], dict[str, Any]]:
        return ["qdata", "scale"], {"dtype": self.dtype}

    @staticmethod
    def __tensor_unflatten__(
        inner: dict[str, torch.Tensor], meta: dict[str, Any], size: Any, stride: Any
    ) -> Int8Weight:
        return Int8Weight(inner["qdata"], inner["scale"], meta["dtype"])

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # Everything is answered here, above the dispatcher: torch imports
        # torch.distributed.tensor (and sympy: ~45 MB, ~2 s) the first time a Python
        # subclass reaches __torch_dispatch__, which would undo what a warm start saves.
        kwargs = kwargs or {}
        this = args[0] if args and isinstance(args[0], Int8Weight) else None
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(weight, Int8Weight) and not isinstance(x, Int8Weight):
                return _linear(x, weight, bias)
        elif this is not None and func is torch.Tensor.to:
            return _to(this, *args[1:], **kwargs)
        elif this is not None and func in _ALIAS_METHODS:
            return this._with()
        elif this is not None and func is torch.Tensor.clone:
            return this._with(qdata=this.qdata.clone(), scale=this.scale.clone())
        elif this is not None and func is torch.Tensor.__deepcopy__:
            return _deepcopy(this, *args[1:])
        name = getattr(func, "__name__", "")
        if this is not None and (func in _METADATA or name in ("__get__", "__set__")):
            with torch._C.DisableTorchFunctionSubclass():  # attributes: on the weight itself
                return func(*args, **kwargs)
        if this is not None and (name in _INPLACE or (name.endswith("_") and name[0] != "_")):
            raise RuntimeError(f"int8 weights are read-only ({name} would change them)")
        with torch._C.DisableTorchFunctionSubclass():
            return func(*tree_map(_plain, args), **tree_map(_plain, kwargs))

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _ALIASES:
            return args[0]._with()
        if func is aten.clone.default:
            return args[0]._with(qdata=args[0].qdata.clone(), scale=args[0].scale.clone())
        if func._schema.is_mutable:
            raise RuntimeError(f"int8 weights are read-only ({func} would change them)")

        return func(*tree_map(_plain, args), **tree_map(_plain, kwargs))


def _plain(value: Any) -> Any:
    return value.dequantize() if isinstance(value, Int8Weight) else value


def _deepcopy(weight: Int8Weight, memo: dict[int, Any]) -> Int8Weight:
    import copy

    copied = weight._with(
        qdata=copy.deepcopy(weight.qdata, memo), scale=copy.deepcopy(weight.scale, memo)
    )
    memo[id(weight)] = copied
    return copied


def _linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """torchao's weight-only int8 linear, operation for operation (identical results)."""
    dtype = x.dtype
    m = torch.mm(x.reshape(-1, x.shape[-1]), weight.qdata.t().to(dtype))
    y = m * weight.scale.to(m.dtype).flatten()
    y = y.reshape(*x.shape[:-1], weight.qdata.shape[0])
    if bias is not None:
        y += bias
    return y.to(dtype)


def _to(weight: Int8Weight, *args: Any, **kwargs: Any) -> Int8Weight:
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    change: dict[str, Any] = {}
    if dtype is not None and dtype.is_floating_point:
        change["dtype"] = dtype
    elif dtype is not None:
        raise TypeError(f"int8 weights compute in a floating dtype, not {dtype}")
    if device is not None and torch.device(device) != weight.device:
        change["qdata"] = weight.qdata.to(device)
        change["scale"] = weight.scale.to(device)
    return weight._with(**change) if change else weight


torch.serialization.add_safe_globals([Int8Weight])
