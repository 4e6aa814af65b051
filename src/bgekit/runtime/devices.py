"""Device and dtype choice, and one model replica per device for multi-device work.

Replicas run in threads, not processes: torch releases the GIL inside kernels and the
tokenizer releases it in Rust, so one thread per device keeps every device busy without
pickling the model or leaving child processes behind at interpreter exit.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..errors import InputError

T = TypeVar("T")
logger = logging.getLogger(__name__)

#: /proc/cpuinfo flags of CPUs that multiply bfloat16 in hardware: x86's AVX512-BF16 and AMX, Arm's BF16
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def resolve_devices(devices: str | int | Sequence[str | int] | None) -> list[str]:
    """Normalise FlagEmbedding-style ``devices`` into torch device strings.

    ``None`` means every visible GPU (or MPS, or the CPU); an int or a list of ints
    names CUDA ordinals; strings pass through (``"cpu"``, ``"cuda:1"``).
    """
    if devices is None:
        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return ["mps"]
        return ["cpu"]
    if isinstance(devices, (str, int)):
        devices = [devices]
    if not isinstance(devices, Sequence) or not devices:
        raise InputError(f"devices must be a device string, an int or a non-empty list of them, got {devices!r}")
    out = []
    for device in devices:
        if isinstance(device, bool) or not isinstance(device, (str, int)):
            raise InputError(f"devices must be strings like 'cuda:0' or ints, got {device!r}")
        name = f"cuda:{device}" if isinstance(device, int) else device.strip()
        try:
            parsed = torch.device(name)
        except RuntimeError:
            raise InputError(f"{name!r} is not a device torch knows (try 'cpu', 'cuda:0', 'mps')") from None
        if parsed.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {name!r} was asked for but CUDA is not available on this machine")
        out.append(name)
    return out


def resolve_dtype(device: str, use_fp16: bool = False, use_bf16: bool = False) -> torch.dtype:
    """float16 / bfloat16 on accelerators when asked; on the CPU bfloat16 when asked, never float16.

    FlagEmbedding's classes default to ``use_fp16=True`` and run float32 on the CPU anyway, and CPUs
    have no fast float16 matrix multiply, so float16 stays a GPU option. bfloat16 is never a default:
    asked for on a CPU that multiplies it in hardware (AVX512-BF16 or AMX: AMD Zen 4, Intel Sapphire
    Rapids and later; Arm's BF16) it about halves the forward's time (benchmarks/RESULTS.md).
    """
    if torch.device(device).type == "cpu":
        if not use_bf16:
            return torch.float32
        if cpu_has_native_bf16() is False:
            _warn_emulated_bf16()
        return torch.bfloat16
    if use_bf16:
        return torch.bfloat16
    if use_fp16:
        return torch.float16
    return torch.float32


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this machine's CPU multiplies bfloat16 in hardware, read from ``/proc/cpuinfo``'s flags
    (``cpuinfo``: that file's text); None where there is no such file to ask (macOS, Windows)."""
    if cpuinfo is None:
        cpuinfo = _cpuinfo()
        if cpuinfo is None:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):  # x86 / Arm
            flags.update(value.split())
    return bool(flags & _NATIVE_BF16_FLAGS)


@cache
def _cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


@cache
def _warn_emulated_bf16() -> None:
    logger.warning(
        "use_bf16=True on a CPU without bfloat16 instructions (no AVX512-BF16, AMX or Arm BF16 in "
        "/proc/cpuinfo): torch emulates it there, expect it slower than float32 (use_bf16=False)"
    )


def _parameter_marks(module: torch.nn.Module) -> tuple:
    """Each parameter's name, identity and in-place version: any write to a weight changes it."""
    return tuple((name, id(p), p._version) for name, p in module.named_parameters())


class ReplicaPool:
    """One copy of a module per device, and a thread per device that runs work items.

    The pool starts on first use with more than one device and shuts down on
    :meth:`close`, when garbage collected, or at interpreter exit, without errors.
    """

    def __init__(self, module: torch.nn.Module, devices: Sequence[str], dtype_for: Callable[[str], torch.dtype]):
        self._devices = list(devices)
        self._pinned = threading.local()  # this thread's one device inside :meth:`only`
        self._dtype_for = dtype_for
        self._primary = module
        self._replicas: dict[str, torch.nn.Module] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None
        self._as_loaded: tuple | None = None  # the first replica's parameters when it was built
        self._changed_before = False  # written before this pool was pickled (the marks do not travel)

    def replica(self, device: str) -> torch.nn.Module:
        """The module on ``device`` (moved there the first time it is asked for)."""
        with self._lock:
            if device not in self._replicas:
                dtype = self._dtype_for(device)
                if not self._replicas:
                    module = self._primary
                else:
                    module = copy.deepcopy(next(iter(self._replicas.values()))).to("cpu")
                self._replicas[device] = module.to(device=device, dtype=dtype).eval()
                if self._as_loaded is None:
                    self._as_loaded = _parameter_marks(self._replicas[device])
            return self._replicas[device]

    def weights_changed(self) -> bool:
        """Whether the model's parameters were written since it was loaded (an optimizer step,
        ``load_state_dict``, a replaced Parameter): its files then no longer say what it computes,
        so caches keyed on them must not be used. Read from torch's in-place version counters."""
        if self._changed_before:
            return True
        first = next(iter(self._replicas.values()), None)
        return first is not None and _parameter_marks(first) != self._as_loaded

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (a model can go to another process or through ``copy.deepcopy``): the replicas
        and the primary module travel, worker threads and locks start afresh."""
        state = self.__dict__.copy()
        for name in ("_executor", "_finalizer", "_lock", "_pinned"):
            state.pop(name)
        state["_changed_before"], state["_as_loaded"] = self.weights_changed(), None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._executor, self._finalizer = None, None
        self._lock, self._pinned = threading.Lock(), threading.local()
        first = next(iter(self._replicas.values()), None)
        self._as_loaded = None if first is None else _parameter_marks(first)

    @property
    def devices(self) -> list[str]:
        """The devices work runs on: all of the pool's, or the one :meth:`only` pins in this thread."""
        pinned = getattr(self._pinned, "device", None)
        return self._devices if pinned is None else [pinned]

    @property
    def primary(self) -> torch.nn.Module:
        return self.replica(self.devices[0])

    @contextmanager
    def only(self, device: str | None) -> Iterator[None]:
        """Run this thread's work on ``device`` alone (one of the pool's) until the block ends;
        ``None`` keeps every device. Other threads keep using them all. FlagEmbedding's
        ``encode_single_device(..., device=)`` runs through this."""
        if device is None:
            yield
            return
        if device not in self._devices:
            raise InputError(f"device {device!r} is not one of this model's devices {self._devices}")
        previous = getattr(self._pinned, "device", None)
        self._pinned.device = device
        try:
            yield
        finally:
            self._pinned.device = previous

    def map(self, fn: Callable[[torch.nn.Module, str, Any], T], items: Sequence[Any]) -> list[T]:
        """Run ``fn(module, device, item)`` for every item, on all devices at once; keep item order."""
        if len(self.devices) == 1 or len(items) <= 1:
            module, device = self.primary, self.devices[0]
            return [fn(module, device, item) for item in items]
        for device in self.devices:
            self.replica(device)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=len(self.devices), thread_name_prefix="bgekit-device")
            self._finalizer = weakref.finalize(self, self._executor.shutdown, wait=True, cancel_futures=True)
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(len(items)):
            todo.put(index)
        results: list[Any] = [None] * len(items)
        failed = threading.Event()

        def worker(device: str) -> None:
            module = self._replicas[device]
            with torch.inference_mode():
                while not failed.is_set():
                    try:
                        index = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        results[index] = fn(module, device, items[index])
                    except BaseException:
                        failed.set()
                        raise

        futures = [self._executor.submit(worker, device) for device in self.devices]
        for future in futures:
            future.result()
        return results

    def close(self) -> None:
        """Stop the worker threads; the primary module stays usable."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._executor = None
