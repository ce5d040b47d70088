"""Files that every process of a run needs and one of them writes (the latent cache, cached real-data features),
whether or not the nodes of a multi-node run share a file system.

`write_once` is called by all processes: the main process writes the file if it is missing while the others wait;
then, on a node that still does not see it (its own local disk), that node's local main process writes its own copy
while the rest wait. On a shared file system the file is written once; without one, once per node. Writers write
under a temporary name unique to (host, process) and rename into place, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """A sibling of `path` that no other process on any node writes to."""
    return path.parent / f".tmp-{path.name}-{socket.gethostname()}-{os.getpid()}"


def write_once(state, exists: Callable[[], bool], write: Callable[[], None]) -> bool:
    """Make `exists()` true on every node with as few `write()` calls as possible; all processes must call this.
    Returns whether this process wrote."""
    wrote = False
    with state.main_process_first():
        if state.is_main_process and not exists():
            write()
            wrote = True
    with state.local_main_process_first():
        if state.is_local_main_process and not wrote and not exists():
            write()
            wrote = True
    return wrote
