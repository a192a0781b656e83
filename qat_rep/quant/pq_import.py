"""Imports pytorch-quantization once, before any of its modules, keeping the process's log lines single."""

from __future__ import annotations

import logging


def import_quietly() -> None:
    """Import pytorch-quantization without doubling every log line of the process.

    Its ``__init__`` calls ``absl.logging.use_absl_handler()``, which puts absl's handler on the *root* logger; and
    every absl call runs ``logging.basicConfig()`` whenever the root logger has no handler. Either way Lightning,
    which lets records propagate to a configured root logger, then prints each INFO line twice (once in absl's
    format, after a "Logging before flag parsing goes to stderr" notice). When this import added absl's handler, it
    is replaced by one that prints WARNING and above as Python's last-resort handler would (``levelname:name:msg``),
    so INFO chatter appears once and warnings still reach stderr. An absl application re-installs absl's handler in
    ``absl.app.run``; ``logging.basicConfig(force=True)`` replaces ours.
    """
    before = list(logging.root.handlers)
    import pytorch_quantization  # noqa: F401

    added = [h for h in logging.root.handlers if h not in before and type(h).__name__ == "ABSLHandler"]
    for handler in added:
        logging.root.removeHandler(handler)
    if added and not logging.root.handlers:
        quiet = logging.StreamHandler()
        quiet.setLevel(logging.WARNING)
        quiet.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        logging.root.addHandler(quiet)


import_quietly()
