"""The one exception class the ``emdloss`` command treats as the user's to fix.

:class:`UsageError` (and its subclasses :class:`emdloss_lab.experiments.runner.CheckpointError` and
:class:`emdloss_lab.data.DataUnavailable`) means "what you asked for cannot run as asked": an output folder
with another run in it, a missing data folder, an option with an impossible value. Its message says what is
wrong and what to do, in one line. :func:`emdloss_lab.cli.main` prints it as ``emdloss: error: MESSAGE`` and
exits with status 2 (the traceback only under ``emdloss --debug``); every other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations


class UsageError(Exception):
    """A mistake in how the command was called or in what it was given; the message says how to fix it."""
