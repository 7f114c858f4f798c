"""No orphans: a process that only works for its parent dies with it.

Two kinds of processes outlive their parent unless told otherwise:

* the ranks of a node, when the launcher's agent dies (SIGKILL, OOM killer): they would train on
  unsupervised, holding the run directory and the GPUs;
* the writer processes that Megatron's checkpoint save forks, when their rank dies mid-save: they
  wait on queues that nobody reads any more, for ever.

Linux lets a process ask for a signal when its parent ends (``prctl(PR_SET_PDEATHSIG)``); the
request is made by the child itself, and a parent that ended before the request was made is caught
by comparing the parent's pid with the one expected. Elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from typing import Optional

PR_SET_PDEATHSIG = 1
"""From ``<linux/prctl.h>``."""
LAUNCHER_PID_ENV = "MEGATRON_EXT_LAUNCHER_PID"
"""Set by ``pretrain.launch`` for its workers: the pid of the agent that started them."""


def die_with_parent(expected_parent: Optional[int] = None, sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent ends; when ``expected_parent``
    is given and the parent is already another process (it ended before this call), send it now.
    Returns whether the request could be made (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)
    return True


def rank_dies_with_agent(environ=os.environ) -> bool:
    """In a rank started by torchrun's agent (``pretrain.launch`` or plain torchrun): die when the
    agent dies. Returns whether this process is such a rank."""
    if "TORCHELASTIC_RUN_ID" not in environ:
        return False
    launcher = environ.get(LAUNCHER_PID_ENV, "")
    die_with_parent(int(launcher) if launcher.isdigit() else None)
    return True
