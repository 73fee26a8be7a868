"""Drawing a statement's progress: the lines ``sluice run`` draws (one per LLM function with
rows done out of rows handed to it, rate, retries, cache hits, errors, tokens and ETA; then the
run's batch jobs), in a terminal or in a Jupyter notebook.

The engine calls a display with ``(lines, finished)`` about four times a second while a
statement runs, where ``lines`` is a list of ``(name, text)``, and once more when it ends.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any, Callable, List, Optional, Tuple, Union

Lines = List[Tuple[str, str]]
Display = Callable[[Lines, bool], None]


def _elapsed(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _text(lines: Lines, started: float) -> List[str]:
    took = _elapsed(time.monotonic() - started)
    return [f"{name} {text} [{took}]" for name, text in lines]


class Terminal:
    """Redraws the lines in place on a terminal (ANSI cursor moves, cut to its width)."""

    def __init__(self, stream: Any = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._started = time.monotonic()
        self._drawn = 0

    def __call__(self, lines: Lines, finished: bool) -> None:
        width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
        out = []
        if self._drawn:
            # Back to the first line drawn, and clear from there down.
            out.append(f"\x1b[{self._drawn}F\x1b[J")
        shown = [t[:width] for t in _text(lines, self._started)]
        out.extend(t + "\n" for t in shown)
        self._stream.write("".join(out))
        self._stream.flush()
        self._drawn = 0 if finished else len(shown)


class Notebook:
    """Updates one output area of a Jupyter cell in place."""

    def __init__(self) -> None:
        self._started = time.monotonic()
        self._handle: Any = None

    def __call__(self, lines: Lines, finished: bool) -> None:
        from IPython.display import Pretty, display

        shown = Pretty("\n".join(_text(lines, self._started)))
        if self._handle is None:
            if not lines:
                return
            self._handle = display(shown, display_id=True)
        else:
            self._handle.update(shown)


class Plain:
    """Writes the last state once, when the statement ends (logs, pipes, CI)."""

    def __init__(self, stream: Any = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._started = time.monotonic()

    def __call__(self, lines: Lines, finished: bool) -> None:
        if finished and lines:
            self._stream.write("".join(t + "\n" for t in _text(lines, self._started)))
            self._stream.flush()


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    try:
        ip = shell.get_ipython()  # type: ignore[attr-defined]
    except Exception:
        return False
    return ip is not None and getattr(ip, "kernel", None) is not None


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:
        return False


Setting = Union[None, bool, str, Display]


def check(setting: Setting) -> Setting:
    """The session's ``progress`` setting, checked when it is given."""
    if setting is None or isinstance(setting, bool) or callable(setting):
        return setting
    if setting in ("auto", "terminal", "notebook", "plain", "off"):
        return setting
    raise ValueError(
        f"progress: expected True, False, 'auto', 'terminal', 'notebook', 'plain', 'off' or a "
        f"callable(lines, finished), got {setting!r}"
    )


def display_for(setting: Setting) -> Optional[Display]:
    """A fresh display for one statement: ``None``/``"auto"`` draws in a notebook or on a
    terminal's stderr and nowhere else; ``True`` draws in a notebook, on a terminal, else once at
    the end; ``False``/``"off"`` draws nothing; a callable is called as it is."""
    if callable(setting) and not isinstance(setting, bool):
        return setting
    if setting is False or setting == "off":
        return None
    if setting == "terminal":
        return Terminal()
    if setting == "notebook":
        return Notebook()
    if setting == "plain":
        return Plain()
    if _in_notebook():
        return Notebook()
    if _is_terminal(sys.stderr):
        return Terminal()
    return Plain() if setting is True else None
