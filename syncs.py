"""Host-device syncs: the operations that make the host wait until the GPU has caught up, draining its queue.
`no_syncs(device)` fails on the first one inside it: on CUDA through torch.cuda.set_sync_debug_mode("error"),
elsewhere through SyncRecorder, which spots on a CPU the operations that would wait on a GPU. main.py runs
its quiet training steps under it with --check_syncs; bench.py counts them; tests/test_syncs.py proves none.
"""

import os
import sys
import traceback
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
PROJECT = os.path.dirname(os.path.abspath(__file__))
# Operations whose result the host must read before it can go on: a value (item, bool, tolist), or a size that
# depends on the data (nonzero, masked_select, unique, ...). masked_scatter is one for its backward, a
# masked_select. Boolean indexing and index_put with a boolean mask run nonzero inside.
WAITING_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
               aten.allclose.default, aten.nonzero.default, aten.nonzero_numpy.default, aten.argwhere.default,
               aten.masked_select.default, aten.masked_scatter.default, aten.unique_dim.default,
               aten._unique.default, aten._unique2.default, aten.unique_consecutive.default,
               aten.bincount.default, aten.repeat_interleave.Tensor}
INDEXING_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# Tensor methods that read a tensor back without a dispatched operation on a CPU (on a GPU each copies it to
# the host first), and those that copy to the host when asked to: to() and copy_() into a host tensor, unless
# non_blocking (a copy queued for the device, as the step's inputs take on the way in)
READING_METHODS = ("tolist", "numpy", "cpu")
COPYING_METHODS = ("to", "copy_")


def blocking_copy_to_host(name: str, tensor: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether tensor.to(*args, **kwargs) or tensor.copy_(*args, **kwargs), called from TinyVLM's own code, is a
    copy to the host that waits. Libraries' calls are left out: theirs keep a tensor on its device (torch's
    clip_grad_norm_ moves each norm .to(the first one's device)), which a CPU cannot tell from a copy home."""
    caller = sys._getframe(2).f_code.co_filename
    if "-packages" + os.sep in caller or not caller.startswith(PROJECT):
        return False
    if name == "copy_":
        non_blocking = kwargs.get("non_blocking", args[1] if len(args) > 1 else False)
        return tensor.device.type == "cpu" and not non_blocking
    device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
    return device is not None and device.type == "cpu" and not non_blocking


class SyncRecorder(TorchDispatchMode):
    """Records every operation run inside it that would make the host wait for a GPU, with where it ran.
    On a CPU every tensor is a host tensor, so this is what the same code would do on a GPU: a value or a
    data-dependent size read back, and a blocking copy to the host (.cpu(), .numpy(), .to("cpu"), copy_ into
    a host tensor). What it cannot see: copies made inside C++ (DistributedDataParallel rebuilding its buckets
    in its second step: main.py checks from the third there); CUDA's sync debug mode sees those."""

    def __init__(self, raise_on_sync: bool = False):
        super().__init__()
        self.raise_on_sync, self.syncs, self.originals = raise_on_sync, [], {}

    def record(self, name: str) -> None:
        where = "".join(traceback.format_stack(limit=8)[:-2])
        self.syncs.append((name, where))
        if self.raise_on_sync:
            raise RuntimeError(f"{name} makes the host wait for the device, in a step that must not:\n{where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in WAITING_OPS or (func in INDEXING_OPS and any(
                isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
                for index in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else []))):
            self.record(str(func))
        return func(*args, **kwargs)

    def __enter__(self):
        for name in READING_METHODS + COPYING_METHODS:
            original = self.originals[name] = getattr(torch.Tensor, name)

            def reading(tensor, *args, _name=name, _original=original, **kwargs):
                if _name in READING_METHODS or blocking_copy_to_host(_name, tensor, args, kwargs):
                    self.record(f"Tensor.{_name}()")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, reading)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


@contextmanager
def no_syncs(device: torch.device, enabled: bool = True):
    """Raise on the first operation inside that makes the host wait for the device: on CUDA,
    torch.cuda.set_sync_debug_mode("error"); on other devices, SyncRecorder. Does nothing when not enabled."""
    if not enabled:
        yield
    elif device.type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    else:
        with SyncRecorder(raise_on_sync=True):
            yield
