"""Worker threads at low CPU priority, for work that must not slow ordinary requests.

Linux schedules threads, not processes, and lets a thread raise its own nice value
(`setpriority(PRIO_PROCESS, thread id, nice)`): a pool whose threads run at nice 19 gets about 1.5 %
of a core that a nice-0 thread also wants, and every idle cycle otherwise. The server runs the
costly, rare work there: decoding and drawing images over `--low-priority-pixels`, and the pieces
of large ModelInfer requests (serving.batcher's bulk lane). Pillow and ONNX Runtime release the GIL
while they compute, so a low-priority thread holds it only briefly. Threads such a thread starts
(ONNX Runtime's intra-op pool, for one) inherit its nice value.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

LOW_PRIORITY_NICE = 19


def lower_priority(nice: int = LOW_PRIORITY_NICE) -> bool:
    """Set the calling thread's nice value to `nice` (never lower than it is); whether it now runs
    at that value. Where threads have no nice value of their own (not Linux), nothing changes."""
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return False
    thread = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, thread) < nice:
            os.setpriority(os.PRIO_PROCESS, thread, nice)
        return os.getpriority(os.PRIO_PROCESS, thread) >= nice
    except OSError as error:
        log.warning("cannot lower the priority of thread %s: %s", thread, error)
        return False


def low_priority_pool(workers: int, name: str, nice: int = LOW_PRIORITY_NICE) -> ThreadPoolExecutor:
    """A thread pool whose threads run at nice `nice`."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=lower_priority, initargs=(nice,))


def thread_nice() -> int:
    """The calling thread's own nice value (the process's where threads have none)."""
    if hasattr(os, "getpriority") and hasattr(threading, "get_native_id"):
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    return 0
