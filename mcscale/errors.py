"""The errors a user can cause, in a module without heavy imports, so the command line can report
them before torch loads. Each message is one line naming the file or setting and the fix."""

from __future__ import annotations


class RunError(Exception):
    """A user-caused problem found at run time; its message is one line naming the file and the fix."""


class StopRequested(Exception):
    """Raised at a step boundary after SIGTERM / SIGUSR1, once a checkpoint is written."""
