"""How bench.py measures: host syncs per step (a torch dispatch mode that counts the ops that make the host wait
for the device), peak memory of a phase (CUDA's allocator statistics, or the process's resident set on a CPU) and
timings of several variants interleaved, so that a changing background load hits them alike."""
import re
import resource
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostSyncCounter(TorchDispatchMode):
    """Counts ops that make the host wait for the device: scalar reads (.item(), bool(t), int(t)),
    data-dependent shapes (nonzero, masked_select, boolean indexing) and host<->device copies.
    Counting is device-independent, so a CPU run shows what would stall a GPU."""

    SCALAR_READS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique",
                    "_unique2", "unique_consecutive", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("index", "index_put", "index_put_") and self._boolean_index(args):
            name += "[bool mask]"  # t[mask] runs nonzero inside the kernel: a data-dependent shape
        elif not (name in self.SCALAR_READS
                  or (name in ("_to_copy", "copy_") and self._crosses_host(name, args, kwargs))):
            return func(*args, **kwargs)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **kwargs)

    @staticmethod
    def _boolean_index(args) -> bool:
        indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)

    @staticmethod
    def _crosses_host(name, args, kwargs) -> bool:
        if name == "copy_":
            devices = {args[0].device.type, args[1].device.type}
        else:
            target = kwargs.get("device")
            devices = {args[0].device.type, (target.type if target is not None else args[0].device.type)}
        return "cpu" in devices and len(devices) > 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_host_syncs(fn) -> dict:
    """Run fn() once under HostSyncCounter; on CUDA also under torch's own sync debug mode."""
    counter = HostSyncCounter()
    cuda_warnings = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with counter:
                fn()
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.set_sync_debug_mode("default")
                cuda_warnings = sum("synchroniz" in str(w.message) for w in caught)
    return {"total": counter.total, "by_op": dict(sorted(counter.counts.items())),
            "cuda_sync_debug_warnings": cuda_warnings}


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_proc_kib(field_name: str) -> int | None:
    try:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        return int(match.group(1)) if match else None
    except OSError:
        return None


class PeakMemory:
    """Peak memory of a phase (see the module docstring for what is measured on each device)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = self._method()

    def _method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated during the phase (bytes of tensors)"
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            if _read_proc_kib("VmHWM") is not None:
                return "peak resident set size of the whole process during the phase (VmHWM after /proc/self/clear_refs)"
        except OSError:
            pass
        return "peak resident set size of the process since it started (ru_maxrss; not reset per phase)"

    def reset(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif "clear_refs" in self.method:
            Path("/proc/self/clear_refs").write_text("5")

    def current_bytes(self) -> int:
        """What the phase starts from: allocated tensors (CUDA) or the resident set (CPU)."""
        if self.device.type == "cuda":
            synchronize(self.device)
            return int(torch.cuda.memory_allocated(self.device))
        rss = _read_proc_kib("VmRSS")
        return rss * 1024 if rss is not None else 0

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if "clear_refs" in self.method:
            return _read_proc_kib("VmHWM") * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def interleaved_timings(runners: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of every runner in every repeat; the order alternates between repeats."""
    names = list(runners)
    seconds = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            synchronize(device)
            t0 = time.perf_counter()
            runners[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - t0)
    return seconds
