"""Progress bars for long host-side loops (sensitivity sweeps, calibration passes).

tqdm is an optional dependency: without it, or when stderr is not a terminal (a log file, CI, a
notebook's captured stream), `progress` hands back the iterable itself and prints nothing.
"""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


def _tqdm():
  try:
    from tqdm.auto import tqdm  # optional dependency
  except ImportError:
    return None
  return tqdm


def progress_enabled(enable: Optional[bool] = None) -> bool:
  """Whether `progress` would draw a bar.

  Args:
    enable: ``None`` (a bar when tqdm is installed and stderr is a terminal), ``True`` (a bar
      whenever tqdm is installed) or ``False`` (never).

  Returns:
    True when a bar would be drawn.
  """
  if enable is not None and not isinstance(enable, bool):
    raise ValueError(f"enable: expected None, True or False, got {enable!r}.")
  if enable is False or _tqdm() is None:
    return False
  if enable:
    return True
  isatty = getattr(sys.stderr, "isatty", None)
  return bool(isatty is not None and isatty())


def progress(iterable: Iterable[T], *, total: Optional[int] = None, desc: Optional[str] = None,
             enable: Optional[bool] = None) -> Iterator[T]:
  """Iterates over ``iterable``, with a tqdm bar on stderr when `progress_enabled` says so.

  Example::

    for batch in progress(batches, desc="calibration"):
      ...

  Args:
    iterable: what to iterate over.
    total: number of items, when ``iterable`` has no ``len``.
    desc: label shown before the bar.
    enable: see `progress_enabled`.

  Returns:
    An iterator over the items of ``iterable``, in order.
  """
  if not progress_enabled(enable):
    return iter(iterable)
  return iter(_tqdm()(iterable, total=total, desc=desc, leave=False, file=sys.stderr))
