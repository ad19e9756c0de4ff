"""Failures in Ray workers, told apart by Ray's exception types, never by their text.

A worker's own exception reaches the driver inside Ray's: as the ``cause`` of a
``ray.exceptions.RayTaskError`` (a task or an actor method raised it), or as the cause of the
RayTaskError that Ray builds a ``ray.exceptions.ActorDiedError`` from when an actor's
constructor raised (its ``actor_init_failed``). Ray Data wraps an exception of a function it
maps in a ``ray.exceptions.UserCodeException`` of its own and keeps only its text; with the
dataset's ``raise_original_map_exception``, it passes on the exception the function raised,
and :func:`carried` makes that one a UserCodeException holding the original (so that Ray Data
still reports it as the user's code's failure). Any other ``ray.exceptions.RayError``
(``ActorDiedError``, ``ActorUnavailableError``, ``WorkerCrashedError``, ``OutOfMemoryError``,
``NodeDiedError`` ...) is Ray's report of a worker that died: killed, out of memory, or its node
lost.
"""
from __future__ import annotations

from .connection import import_ray

#: Tries again of a block of images whose scoring actor died (killed, out of memory, node
#: lost; the actor itself is restarted each time), and of a fit task whose worker died. A block
#: that kills its actor this often fails the run (no output) instead of looping; a Python
#: exception is not retried: it is an image's or a job's own error.
MAX_RETRIES = 4


def error_text(error: BaseException) -> str:
    """``"TypeName: message"`` of an exception."""
    return f"{type(error).__name__}: {error}"


def carried(error: Exception) -> Exception:
    """``error``, raised in a Ray worker by a function that Ray Data maps, wrapped to reach the
    driver whole: a ``ray.exceptions.UserCodeException`` whose first argument is ``error``
    (found again by :func:`worker_exception`). Raise it ``from error``, in a dataset with
    ``raise_original_map_exception`` set."""
    return import_ray().exceptions.UserCodeException(error)


def worker_exception(error: BaseException) -> BaseException:
    """The exception behind Ray's ``error``: the worker's own exception where one reached the
    driver (see the module docstring: a RayTaskError's cause, an actor's constructor's
    exception, one :func:`carried`), else Ray's innermost error, which tells of a worker that
    died."""
    exceptions = import_ray().exceptions
    if isinstance(error, exceptions.RayActorError) and error.actor_init_failed:
        # ActorDiedError(cause) keeps its one argument: the constructor's RayTaskError.
        error = next((arg for arg in error.args if isinstance(arg, exceptions.RayTaskError)),
                     error)
    while True:
        if isinstance(error, exceptions.RayTaskError):
            error = error.cause
        elif isinstance(error, exceptions.UserCodeException) and error.args \
                and isinstance(error.args[0], BaseException):
            error = error.args[0]
        else:
            return error


def failure_text(error: BaseException) -> str:
    """``"TypeName: message"`` of :func:`worker_exception` of Ray's ``error``; of Ray's own
    errors, whose messages run over many lines of details, the first line only."""
    found = worker_exception(error)
    text = error_text(found)
    return text.splitlines()[0] if isinstance(found, import_ray().exceptions.RayError) else text
