"""Batches built ahead of the step that uses them, on a background thread.

A step's micro-batches are a pure function of (step, micro-step, rank) (``raydistill.data.blocks``), so they
can be built before the step runs: while the device works on step n, a thread builds step n+1's batches on
the CPU, counts their tokens there (a host integer, so the loop never reads a device tensor to count), and on
CUDA copies them into pinned memory and onto the device on a side stream. ``get`` hands them over in order;
the consuming stream waits for the copy (``wait_stream``) and each tensor is marked as used by it
(``record_stream``), so the caching allocator never reuses its memory while the step still reads it.

An exception raised while building re-raises in ``get``; ``close`` stops the thread (a run that fails or
ends early leaves nothing behind)."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable

import torch

_STOP = object()


def _map(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(v, fn) for v in tree)
    return tree


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """``make(key) -> tree of CPU tensors`` for each key of ``keys``, built ``depth`` keys ahead.

    ``get(key)`` returns ``(cpu, on_device)``: the tree as built, and the same tree on ``device`` (the CPU tree
    itself on a CPU device). Keys must be asked for in order."""

    def __init__(self, make: Callable[[Any], Any], keys: Iterable[Any], device: torch.device | str = "cpu",
                 depth: int = 2):
        self.make, self.device = make, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._thread = threading.Thread(target=self._work, args=(iter(keys),), daemon=True,
                                        name="raydistill-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, keys) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
            for key in keys:
                if self._stop.is_set():
                    return
                cpu = self.make(key)
                moved = cpu
                if self.cuda:
                    pinned = _map(cpu, lambda t: t.pin_memory())
                    with torch.cuda.stream(self._stream):
                        moved = _map(pinned, lambda t: t.to(self.device, non_blocking=True))
                    event = torch.cuda.Event()
                    event.record(self._stream)
                    moved = (moved, event)
                if not self._put((key, cpu, moved)):
                    return
            self._put(_STOP)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failed(e))

    def get(self, key: Any) -> tuple[Any, Any]:
        item = self._queue.get()
        if isinstance(item, _Failed):
            raise item.error
        if item is _STOP:
            raise RuntimeError(f"prefetch: asked for {key!r} after the last key")
        got, cpu, moved = item
        if got != key:
            raise RuntimeError(f"prefetch: asked for {key!r}, the next built is {got!r}")
        if self.cuda:
            moved, event = moved
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)  # the copy is done before this stream reads the batch
            _map(moved, lambda t: t.record_stream(stream) or t)
        return cpu, moved

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a thread waiting to put
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
