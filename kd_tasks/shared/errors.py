"""Errors that name the problem and the fix, and the one error boundary every subcommand shares.

Every ``kd-tasks`` subcommand runs its body through :func:`run_cli`::

    def main(argv=None):
        return run_cli("classify", _main, argv)      # _main(argv) -> exit code

An error caused by the input (a :class:`KDError`, or an ordinary mistake the boundary recognises:
a missing or unreadable file, a path that is a directory, a full disk, a file that is not an image,
a malformed YAML/JSON file, a missing optional package) ends as one line on stderr::

    kd-tasks classify: error: <what is wrong> — <how to fix it>

with exit code 2 and no traceback. ``--debug`` anywhere on the command line (or the environment
variable ``KD_TASKS_DEBUG=1``) prints the traceback as well. Anything else is a bug in kd-tasks: the
traceback is printed, followed by a line saying so, and the exit code is 1. Ctrl-C ends with exit
code 130 (the training loop first saves the step it was finishing).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import sys
import traceback
from typing import Callable, Iterable, Sequence
from .distributed import process_group_teardown

DEBUG_ENV = "KD_TASKS_DEBUG"
DEBUG_FLAG = "--debug"
EXIT_INPUT = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130


class KDError(Exception):
    """Base class for kd-tasks errors: the input is wrong, and the message says what and how to fix it.

    ``hint`` (optional) is the fix; the CLI prints ``<message> — <hint>``.
    """

    def __init__(self, *args, hint: str | None = None):
        super().__init__(*args)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} — {self.hint}" if self.hint else base


class KDConfigError(KDError, ValueError):
    """A recipe or argument is wrong: unknown name, unknown key, missing field."""


class ShapeMismatchError(KDError, ValueError):
    """Student and teacher tensors cannot be compared as given."""


class UnknownTapError(KDError, KeyError):
    """A tapped module name does not exist in the model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class NonFiniteLossError(KDError, FloatingPointError):
    """A loss term became NaN or infinite."""


class OutputDirInUseError(KDConfigError):
    """The output directory holds another run; ``--resume`` or ``--overwrite`` decides what to do."""


class RunMismatchError(KDConfigError):
    """A checkpoint belongs to another run (other student, teacher, recipe, data or settings)."""


class CheckpointError(KDError):
    """A checkpoint is damaged (truncated, edited, missing files) and no intact one is left."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after the step in progress was finished and saved at ``step`` (``path``)."""

    def __init__(self, step: int, path=None):
        super().__init__(f"saved step {step}")
        self.step, self.path = step, path


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Closest names to ``name`` among ``candidates``: fuzzy matches first, then substring hits."""
    candidates = list(candidates)
    out = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    tail = name.split(".")[-1]
    for c in candidates:
        if len(out) >= n:
            break
        if c not in out and (tail and tail in c.split(".")[-1] or name in c):
            out.append(c)
    return out


def suggest(name: str, candidates: Iterable[str], what: str) -> str:
    """A sentence ``unknown <what> 'x'; did you mean ...? known: ...`` for error messages."""
    candidates = sorted(set(candidates))
    matches = close_matches(name, candidates)
    msg = f"unknown {what} {name!r}"
    if matches:
        msg += f"; did you mean {', '.join(repr(m) for m in matches)}?"
    if len(candidates) <= 40:
        msg += f" Known: {', '.join(candidates) if candidates else '(none)'}."
    else:
        msg += f" ({len(candidates)} known; print them with the model's named_modules())."
    return msg


# ---------------------------------------------------------------------------------- the CLI boundary


def one_line(text: str) -> str:
    """``text`` on one line (newlines and runs of spaces folded)."""
    return " ".join(str(text).split())


def _os_error_message(e: OSError) -> str | None:
    import errno

    where = f" {str(e.filename)!r}" if e.filename is not None else ""
    reason = e.strerror or str(e)
    fixes = {
        errno.ENOENT: "check the path",
        errno.EACCES: "check its permissions, or choose another path",
        errno.EPERM: "check its permissions, or choose another path",
        errno.EROFS: "the file system is read-only; choose another path",
        errno.EISDIR: "give a file, not a directory",
        errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
        errno.ENOSPC: "free some disk space, or choose another output directory",
        errno.EEXIST: "remove it or choose another path",
    }
    if e.errno is None and e.filename is None:  # raised by kd-tasks or a library with its own message
        return one_line(e) if str(e) else f"{type(e).__name__} — check the paths given"
    return f"{reason}:{where} — {fixes.get(e.errno, 'check the file system and the path')}"


def input_error_message(e: BaseException) -> str | None:
    """The one-line message of an error caused by the input, or ``None`` for anything else (a bug)."""
    if isinstance(e, KDError):
        return one_line(str(e))  # "<what> — <fix>" when the error carries a hint
    if isinstance(e, ModuleNotFoundError) and e.name and not e.name.startswith("kd_tasks"):
        return (f"needs the package {e.name!r}, which is not installed — pip install it, or the kd-tasks extra of "
                "this subcommand (e.g. pip install 'kd-tasks[all]')")
    if isinstance(e, OSError):
        return _os_error_message(e)
    name = type(e).__name__
    module = type(e).__module__ or ""
    if name == "UnidentifiedImageError":  # PIL: a file that is not an image
        return f"{one_line(e)} — remove the file or replace it with a readable image"
    if module.startswith("yaml"):
        return f"malformed YAML: {one_line(e)} — fix the file's syntax"
    if name == "JSONDecodeError":
        return f"malformed JSON: {one_line(e)} — fix or remove the file"
    return None


class _State:
    depth = 0
    debug = False


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    return _State.debug or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no") or (
        argv is not None and DEBUG_FLAG in argv)


@contextlib.contextmanager
def _boundary_depth():
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1


def run_cli(prog: str, fn: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``fn(argv)`` inside the error boundary of ``kd-tasks <prog>`` and return the exit code.

    ``argv`` defaults to ``sys.argv[1:]``; ``--debug`` is taken out of it before ``fn`` sees it. Input
    errors print ``kd-tasks <prog>: error: ...`` (exit 2), Ctrl-C exits 130, a bug prints its
    traceback and says so (exit 1). Boundaries nest: an inner one (a subcommand's own ``main``)
    handles the error and the outer one (``kd-tasks``) only passes its exit code on.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    name = prog if prog.startswith("kd-tasks") else f"kd-tasks {prog}"
    outer_debug = _State.debug
    _State.debug = debug
    try:
        with _boundary_depth(), process_group_teardown():
            return int(fn(argv) or 0)
    except SystemExit:
        raise  # argparse's --help / usage errors, already printed
    except TrainingInterrupted as e:
        if debug:
            traceback.print_exc()
        print(f"{name}: interrupted: saved step {e.step}; continue with --resume", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{name}: interrupted — nothing new was saved; run again (with --resume if a checkpoint exists)",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 -- the boundary: sort input errors from bugs
        message = input_error_message(e)
        if message is None:
            traceback.print_exc()
            print(f"{name}: internal error: {type(e).__name__}: {one_line(e)} — this is a bug in kd-tasks, not in "
                  "your input; please report it with the traceback above", file=sys.stderr, flush=True)
            return EXIT_BUG
        if debug:
            traceback.print_exc()
        print(f"{name}: error: {message}", file=sys.stderr, flush=True)
        return EXIT_INPUT
    finally:
        _State.debug = outer_debug


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line: ``<prog>: error: <what> — see <prog> --help``.

    Abbreviated options are refused (``--epoch`` is not silently taken as ``--epochs``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 -- argparse API
        self.exit(EXIT_INPUT, f"{self.prog}: error: {one_line(message)} — see {self.prog} --help\n")


__all__ = [
    "KDError", "KDConfigError", "ShapeMismatchError", "UnknownTapError", "NonFiniteLossError", "OutputDirInUseError",
    "RunMismatchError", "CheckpointError", "TrainingInterrupted", "close_matches", "suggest", "run_cli",
    "input_error_message", "debug_requested", "ArgumentParser", "one_line", "DEBUG_ENV", "EXIT_INPUT", "EXIT_BUG",
    "EXIT_INTERRUPTED",
]
