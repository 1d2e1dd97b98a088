"""The error of a run that fails, apart from the modules that raise it.

Every other library error is a ``ValueError`` subclass defined beside the code that raises it
(``ConfigError``, ``DataError``, ``RunDirError``, ...): bad input, exit status 2 on the command line.
:class:`TrainingError` lives here, imported by nothing of energylab's, so that the training code,
the launcher and the command-line layer (:func:`energylab.cli.run_command`) all see one class.
"""

from __future__ import annotations

__all__ = ["TrainingError"]


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, no device, a full disk); one-line message.

    The command line maps it to exit status 1.
    """
