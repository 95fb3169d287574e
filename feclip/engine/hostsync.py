"""Host-device synchronisations, counted on the CPU (``torch.cuda.set_sync_debug_mode`` needs a GPU).

A GPU runs ahead of the host only while the host never waits for it. What makes the host wait:
reading a device value (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``, ``.numpy()``, ``.cpu()``),
and ops whose output size depends on device values (``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``). :class:`HostSyncCounter` counts those on the CPU, for the tensors that
would live on the GPU: it tells them apart by provenance. The code under test runs with the device
``torch.device("cpu", 0)`` (a CPU device that carries an index, which plain host tensors never have):

* *device* tensors are the ones registered with :meth:`HostSyncCounter.on_device` (model parameters
  and buffers, a cache), the outputs of factory ops and copies that name ``cpu:0``, and every output of
  an op with a device tensor among its inputs;
* every other tensor is a host tensor (a collated batch, a list turned into a tensor): reading those
  costs nothing on a GPU and is not counted.

Each use is counted by name (``counts``); ``syncs`` is their sum. :func:`to_host` is the one blessed
way to bring device results to the host (non-blocking copies into pinned memory, then one wait): it
counts as one synchronisation, whatever it carries (:meth:`HostCopy.wait` is what is counted). A
copy from the host to the device without ``non_blocking=True`` waits for the device's queue on CUDA:
counted as ``blocking_copy``.

Limits: ``t.device`` of a ``cpu:0`` tensor reads ``cpu``, so ``t.to("cpu")`` and ``t.to(x.device)``
are not counted (device code must use :func:`to_host`, ``.cpu()`` or ``.numpy()``, which are: the
checkpoint's per-epoch copies of the weights go unseen), nor is ``torch.tensor(data, device=...)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

DEVICE_UNDER_TEST = torch.device("cpu", 0)

_aten = torch.ops.aten
# ops whose result the host must wait for, or whose output size depends on device values
_SYNC_OPS = {
    _aten._local_scalar_dense.default: "item",
    _aten.is_nonzero.default: "item",
    _aten.nonzero.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten._unique2.default: "unique",
    _aten.unique_dim.default: "unique",
    _aten.unique_consecutive.default: "unique",
    _aten.repeat_interleave.Tensor: "repeat_interleave",
}
_INDEX_OPS = {
    _aten.index.Tensor,
    _aten.index_put.default,
    _aten.index_put_.default,
    _aten._index_put_impl_.default,
}


class HostCopy:
    """Device tensors on their way to host memory: non-blocking copies into pinned memory, queued
    behind the work that computes them, and an event; :meth:`wait` blocks until they have arrived (the
    one synchronisation) and returns them. Meanwhile the host may queue more work for the device (the
    next batch), so the device never waits for the host's handling of the results."""

    def __init__(self, tensors) -> None:
        self.tensors = list(tensors)
        self.event = None
        if any(t.device.type == "cuda" for t in self.tensors):
            self.tensors = [
                torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                if t.device.type == "cuda"
                else t
                for t in self.tensors
            ]
            self.event = torch.cuda.Event()
            self.event.record()

    def wait(self) -> list[torch.Tensor]:
        """The tensors in host memory (blocks until the copies are done)."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.tensors


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Copy device tensors to host memory with one wait (:class:`HostCopy`); host tensors come back
    as they are."""
    return HostCopy(tensors).wait()


class HostSyncCounter(TorchDispatchMode):
    """Count, on the CPU, what would make the host wait for a GPU (see the module docstring).

    Use ``device = DEVICE_UNDER_TEST`` for the code under test, register the tensors that would live on
    the device with :meth:`on_device`, and run the code inside ``with counter:``. ``counts`` holds the
    uses by kind (``item``, ``nonzero``, ``bool_index``, ``tolist``, ``numpy``, ``cpu``, ``to_host``,
    ...), ``syncs`` their total.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._device = WeakIdKeyDictionary()
        self._saved: dict[str, object] = {}
        self._in_to_host = 0

    # -- bookkeeping --------------------------------------------------------------------------------

    @property
    def syncs(self) -> int:
        return sum(self.counts.values())

    def on_device(self, *items) -> HostSyncCounter:
        """Register tensors, modules (their parameters and buffers) or iterables of them as device-resident."""
        for item in items:
            if isinstance(item, torch.Tensor):
                self._device[item] = True
            elif isinstance(item, torch.nn.Module):
                self.on_device(*item.parameters(), *item.buffers())
            elif isinstance(item, Iterable):
                self.on_device(*item)
        return self

    def is_device(self, t: torch.Tensor) -> bool:
        return isinstance(t, torch.Tensor) and t in self._device

    def reset(self) -> None:
        self.counts.clear()

    # -- dispatch: ops ------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = any(t in self._device for t in inputs)
        named = kwargs.get("device")
        born_on_device = on_device or (
            named is not None and torch.device(named).type == "cpu" and torch.device(named).index == 0
        )
        if func in (_aten._to_copy.default, _aten.copy_.default) and not self._in_to_host:
            if func is _aten._to_copy.default:
                src, to_device = args[0], named is not None and torch.device(named).index == 0
                non_blocking = kwargs.get("non_blocking", False)
            else:
                src, to_device = args[1], args[0] in self._device
                non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            if to_device and src not in self._device and not non_blocking:
                self.counts["blocking_copy"] += 1  # host -> device: CUDA waits for the stream
        if on_device and not self._in_to_host:
            kind = _SYNC_OPS.get(func)
            if kind is None and func in _INDEX_OPS:
                indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
                if any(
                    isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                    for i in indices or ()
                ):
                    kind = "bool_index"
            if kind is not None:
                self.counts[kind] += 1
        if born_on_device and not self._in_to_host:  # what to_host returns is host memory
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._device[t] = True
        return out

    # -- Python-level reads -------------------------------------------------------------------------

    def __enter__(self):
        counter = self

        def wrap(name):
            original = getattr(torch.Tensor, name)

            def counted(t, *a, **k):
                if counter.is_device(t) and not counter._in_to_host:
                    counter.counts[name] += 1
                return original(t, *a, **k)

            self._saved[name] = original
            setattr(torch.Tensor, name, counted)

        for name in ("tolist", "numpy", "cpu"):
            wrap(name)

        original_wait = HostCopy.wait

        def counted_wait(copy):
            if any(counter.is_device(t) for t in copy.tensors):
                counter.counts["to_host"] += 1
            counter._in_to_host += 1
            try:  # host memory: copies that the provenance does not follow
                return [t.detach().clone() for t in original_wait(copy)]
            finally:
                counter._in_to_host -= 1

        self._saved_wait = original_wait
        HostCopy.wait = counted_wait
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            HostCopy.wait = self._saved_wait
            for name, original in self._saved.items():
                setattr(torch.Tensor, name, original)
            self._saved.clear()
