"""Ctrl-C around a command-line tool's start-up, before torch is imported (this module imports nothing
heavy): while the imports load (seconds) Ctrl-C ends the tool with one line and exit 130, not the
import's traceback; once they have, `main` hands Ctrl-C back to Python as a KeyboardInterrupt, which the
tool turns into its own one-line message."""
from __future__ import annotations

import os
import signal
import sys
import threading


def quiet_ctrl_c_while_loading(tool: str) -> None:
    signal.signal(signal.SIGINT, lambda *_: (print(f"\n{tool}: interrupted during start-up; nothing was written",
                                                   file=sys.stderr), os._exit(130)))


def ctrl_c_raises() -> None:
    if threading.current_thread() is threading.main_thread():  # signal handlers belong to the main thread
        signal.signal(signal.SIGINT, signal.default_int_handler)
