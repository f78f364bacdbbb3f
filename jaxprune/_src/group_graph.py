"""Axis identities for dependency groups: a union-find over nodes, refined into products and sums.

Every axis of every array in a traced model gets an identity (a `Label`):

* ``None``: a size-1 axis (it carries no unit);
* ``("n", i)``: node ``i`` of the union-find, with a size;
* ``("p", (labels...))``: a row-major product (a flatten of ``(H, W, C)`` is ``H x W x C``; a
  ``(d, heads * head_dim)`` kernel reshaped to heads is ``heads x head_dim``);
* ``("s", (labels...))``: a sum (concatenation along the axis); ``None`` in a sum stands for one
  uncoupled index.

A node that later turns out to be a product (a reshape splits it) is refined in place, so
couplings found before and after the reshape agree. Each class also remembers why it may not be
pruned: ``pin`` (pruning it would change the function) or ``poison`` (a primitive that is not
understood touched it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

Label = Any


class Unsupported(Exception):
  """A coupling the graph cannot represent; the message says which."""


class Graph:
  """Union-find over axis identities with in-place refinement.

  Attributes:
    parent: union-find parent of each node.
    size: number of units of each node.
    ref: nodes refined into a product or sum, by root.
    pin: roots that may not be pruned, with the first reason found.
    poison: roots touched by an unsupported primitive, with the first reason found.
  """

  def __init__(self) -> None:
    self.parent: list[int] = []
    self.size: list[int] = []
    self.ref: dict[int, Label] = {}
    self.pin: dict[int, str] = {}
    self.poison: dict[int, str] = {}

  def new(self, n: int) -> Label:
    """A fresh node of ``n`` units (``None`` when ``n == 1``)."""
    if n == 1:
      return None
    i = len(self.parent)
    self.parent.append(i)
    self.size.append(int(n))
    return ("n", i)

  def fresh(self, shape: Sequence[int]) -> list[Label]:
    """One fresh node per axis of ``shape``."""
    return [self.new(n) for n in shape]

  def find(self, i: int) -> int:
    """Root of node ``i`` (with path compression)."""
    root = i
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[i] != root:
      self.parent[i], i = root, self.parent[i]
    return root

  def lsize(self, lab: Label) -> int:
    """Number of indices of the axis ``lab`` stands for."""
    if lab is None:
      return 1
    if lab[0] == "n":
      return self.size[lab[1]]
    sizes = [self.lsize(k) for k in lab[1]]
    return math.prod(sizes) if lab[0] == "p" else sum(sizes)

  def resolve(self, lab: Label) -> Label:
    """``lab`` in terms of current roots, refinements substituted and nesting flattened."""
    if lab is None:
      return None
    if lab[0] == "n":
      r = self.find(lab[1])
      if r in self.ref:
        return self.resolve(self.ref[r])
      return ("n", r)
    flat: list[Label] = []
    for k in (self.resolve(k) for k in lab[1]):
      if lab[0] == "p" and k is None:
        continue  # size-1 factors carry no index
      if k is not None and k[0] == lab[0]:
        flat.extend(k[1])
      else:
        flat.append(k)
    if not flat:
      return None
    if len(flat) == 1:
      return flat[0]
    return (lab[0], tuple(flat))

  def leaves(self, lab: Label) -> list[int]:
    """The root nodes ``lab`` is made of."""
    lab = self.resolve(lab)
    if lab is None:
      return []
    if lab[0] == "n":
      return [lab[1]]
    return [i for k in lab[1] for i in self.leaves(k)]

  def mark(self, lab: Label, kind: str, reason: str) -> None:
    """Marks every class in ``lab`` as ``kind`` (``"pin"`` or ``"poison"``) unless it is."""
    store = self.pin if kind == "pin" else self.poison
    for i in self.leaves(lab):
      store.setdefault(i, reason)

  def mark_all(self, labs: Iterable[Label], kind: str, reason: str) -> None:
    """`mark` for each label of ``labs``."""
    for lab in labs:
      self.mark(lab, kind, reason)

  def _refine(self, root: int, lab: Label) -> None:
    if root in self.leaves(lab):
      raise Unsupported("an axis coupled with a product/sum that contains itself")
    self.ref[root] = lab
    for i in self.leaves(lab):
      if root in self.pin:
        self.pin.setdefault(i, self.pin[root])
      if root in self.poison:
        self.poison.setdefault(i, self.poison[root])

  def split(self, lab: Label, first: int) -> tuple[Label, Label]:
    """Refines node ``lab`` (``n`` units) into ``first x n / first`` (row-major)."""
    n = self.lsize(lab)
    a, b = self.new(first), self.new(n // first)
    self._refine(lab[1], ("p", (a, b)))
    return a, b

  def union(self, a: Label, b: Label) -> None:
    """Couples two axes of the same length, index for index.

    Raises:
      Unsupported: the lengths differ or the two structures do not align.
    """
    a, b = self.resolve(a), self.resolve(b)
    if a is None and b is None or a == b:
      return
    if self.lsize(a) != self.lsize(b):
      raise Unsupported(f"coupled axes of different lengths {self.lsize(a)} and {self.lsize(b)}")
    if a[0] == "n" and b[0] == "n":
      ra, rb = a[1], b[1]
      self.parent[rb] = ra
      for store in (self.pin, self.poison):
        if rb in store:
          store.setdefault(ra, store[rb])
    elif a[0] == "n":
      self._refine(a[1], b)
    elif b[0] == "n":
      self._refine(b[1], a)
    elif a[0] == b[0] == "s":
      if [self.lsize(k) for k in a[1]] != [self.lsize(k) for k in b[1]]:
        raise Unsupported("concatenations with different segment lengths")
      for x, y in zip(a[1], b[1]):
        self.union(x, y)
    elif a[0] == b[0] == "p":
      self._union_products(list(a[1]), list(b[1]))
    else:
      raise Unsupported("a concatenated axis coupled with a flattened axis")

  def _union_products(self, fa: list[Label], fb: list[Label]) -> None:
    while fa and fb:
      x, y = self.resolve(fa.pop(0)), self.resolve(fb.pop(0))
      if x is not None and x[0] == "p":
        fa[:0] = list(x[1][1:])
        x = x[1][0]
      if y is not None and y[0] == "p":
        fb[:0] = list(y[1][1:])
        y = y[1][0]
      sx, sy = self.lsize(x), self.lsize(y)
      if sx == sy:
        self.union(x, y)
      elif sx > sy and x[0] == "n" and sx % sy == 0:
        head, tail = self.split(x, sy)
        self.union(head, y)
        fa.insert(0, tail)
      elif sy > sx and y[0] == "n" and sy % sx == 0:
        head, tail = self.split(y, sx)
        self.union(x, head)
        fb.insert(0, tail)
      else:
        raise Unsupported("flattened axes whose factors do not align")
    if fa or fb:
      raise Unsupported("flattened axes whose factors do not align")

  def factors(self, lab: Label) -> list[Label]:
    """The row-major factors of ``lab`` (itself when it is not a product)."""
    lab = self.resolve(lab)
    if lab is None:
      return []
    return list(lab[1]) if lab[0] == "p" else [lab]

  def regroup(self, in_labels: Sequence[Label], out_sizes: Sequence[int]) -> list[Label]:
    """Labels of a reshape's output axes: the input factors regrouped row-major.

    Args:
      in_labels: labels of the input axes.
      out_sizes: the output shape.

    Returns:
      One label per output axis; nodes are split where an output axis ends inside one.

    Raises:
      Unsupported: the output axes do not factor the input axes.
    """
    fs = [f for lab in in_labels for f in self.factors(lab)]
    out = []
    for s in out_sizes:
      take: list[Label] = []
      acc = 1
      while acc < s:
        if not fs or s % acc:
          raise Unsupported("reshape whose axes do not factor")
        f = self.resolve(fs.pop(0))
        if f is not None and f[0] == "p":
          fs[:0] = list(f[1][1:])
          f = f[1][0]
        fsz = self.lsize(f)
        need = s // acc
        if need % fsz == 0:
          take.append(f)
          acc *= fsz
        elif f[0] == "n" and fsz % need == 0:
          head, tail = self.split(f, need)
          take.append(head)
          fs.insert(0, tail)
          acc *= need
        else:
          raise Unsupported("reshape whose axes do not factor")
      if acc != s:
        raise Unsupported("reshape whose axes do not factor")
      out.append(self.resolve(("p", tuple(take))) if take else None)
    if any(self.lsize(f) != 1 for f in fs):
      raise Unsupported("reshape whose axes do not factor")
    return out

  def unit_maps(self, lab: Label) -> list[tuple[int, np.ndarray]]:
    """``(class root, unit of each index of the axis or -1)`` for every class in ``lab``."""
    lab = self.resolve(lab)
    if lab is None:
      return []
    if lab[0] == "n":
      return [(lab[1], np.arange(self.size[lab[1]], dtype=np.int32))]
    sizes = [self.lsize(k) for k in lab[1]]
    n = self.lsize(lab)
    out = []
    if lab[0] == "p":
      idx = np.arange(n)
      stride = n
      for k, s in zip(lab[1], sizes):
        stride //= s
        pos = (idx // stride) % s
        for root, m in self.unit_maps(k):
          out.append((root, m[pos]))
    else:
      off = 0
      for k, s in zip(lab[1], sizes):
        for root, m in self.unit_maps(k):
          full = np.full(n, -1, dtype=np.int32)
          full[off:off + s] = m
          out.append((root, full))
        off += s
    return out
