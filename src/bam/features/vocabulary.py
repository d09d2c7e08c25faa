"""Dense codes for the syscalls a baseline has seen, so n-grams pack into 64-bit keys.

Code 0 is the start-of-sequence pad, code 1 any call never seen in training (OOV), codes 2.. the
known calls. The vocabulary persists as syscall *names*, not canonical ids, because canonical ids
are positions in a table that may grow between BAM versions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from bam.syscalls import id_of, name_of

PAD = 0
OOV = 1


class Vocabulary:
    """Maps canonical syscall ids to dense codes (``PAD``, ``OOV``, then known calls)."""

    def __init__(self, ids: npt.ArrayLike) -> None:
        self.ids_ = np.unique(np.asarray(ids, dtype=np.int64)).astype(np.int32)
        self._lut_size = int(self.ids_.max()) + 2 if len(self.ids_) else 1
        self._lut = np.full(self._lut_size, OOV, dtype=np.int32)
        self._lut[self.ids_] = np.arange(2, len(self.ids_) + 2, dtype=np.int32)

    @classmethod
    def fit(cls, seqs: Sequence[npt.NDArray[np.int32]]) -> Vocabulary:
        """The set of calls present in ``seqs``."""
        if not seqs:
            return cls(np.empty(0, np.int32))
        return cls(np.unique(np.concatenate([np.unique(s) for s in seqs])))

    @property
    def size(self) -> int:
        """Number of codes, including ``PAD`` and ``OOV``."""
        return len(self.ids_) + 2

    @property
    def bits(self) -> int:
        """Bits needed for one code."""
        return max(1, int(self.size - 1).bit_length())

    def max_order(self, wanted: int) -> int:
        """Longest n-gram (up to ``wanted``) whose packed key fits in 64 bits.

        A host-wide baseline may see hundreds of distinct calls; rather than refusing, n-gram
        models shorten their context (e.g. 8 -> 7 above 254 calls) and record the order used.
        """
        return max(1, min(wanted, 64 // self.bits))

    def encode(self, sid: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Dense codes for canonical ids (unknown -> ``OOV``)."""
        s = np.asarray(sid, dtype=np.int64)
        out = np.full(s.shape, OOV, dtype=np.int64)
        ok = (s >= 0) & (s < self._lut_size)
        out[ok] = self._lut[s[ok]]
        return out

    def name(self, code: int) -> str:
        """Human-readable name of a dense code."""
        if code == PAD:
            return "^"
        if code == OOV:
            return "<unseen>"
        return name_of(int(self.ids_[code - 2]))

    def names(self) -> list[str]:
        """Names of the known calls (for persistence)."""
        return [name_of(int(i)) for i in self.ids_]

    @classmethod
    def from_names(cls, names: Sequence[str]) -> Vocabulary:
        """Rebuild from saved names, mapping them to this BAM's canonical ids (order kept)."""
        ids = np.array([_id_from_name(n) for n in names], dtype=np.int32)
        if len(ids) and np.any(np.diff(ids) <= 0):
            # A newer syscall table may order names differently: keep the saved code order.
            v = cls(np.empty(0, np.int32))
            v.ids_ = ids
            v._lut_size = int(ids.max()) + 2
            v._lut = np.full(v._lut_size, OOV, dtype=np.int32)
            v._lut[ids] = np.arange(2, len(ids) + 2, dtype=np.int32)
            return v
        return cls(ids)


def _id_from_name(name: str) -> int:
    if name.startswith("#") and name[1:].isdigit():  # an id BAM could not name when saved
        return int(name[1:])
    if "#" in name:  # unnamed number, e.g. "x86_64#451"
        from bam.syscalls import canonical_ids

        arch, nr = name.split("#", 1)
        if arch in ("x86_64", "i386") and nr.isdigit():
            return int(canonical_ids([int(nr)], arch)[0])  # type: ignore[arg-type]
    return id_of(name)
