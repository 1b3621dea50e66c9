"""Exact and near-duplicate texts: datasketch's MinHash LSH proposes, the exact Jaccard decides.

Texts are compared normalized: Unicode NFKC, lower case, punctuation dropped, whitespace collapsed.
A *near* duplicate has a Jaccard similarity >= 0.9 between the two texts' sets of character 5-grams.
Candidates come from MinHash LSH (128 permutations, seed 0, 16 bands of 8 rows: a pair at Jaccard 0.9
shares a band with p = 1 - (1 - 0.9**8)**16 > 0.9999) and each is confirmed with the exact Jaccard, so
the LSH only decides how fast, never what is reported.
"""

from __future__ import annotations

import re
import unicodedata

from datasketch import MinHash, MinHashLSH

NEAR_THRESHOLD = 0.9
SHINGLE = 5
_PERMS, _BANDS, _ROWS = 128, 16, 8
_SEED = 0
_MAX_CANDIDATES = 200  # per query: keeps a file of near-identical templates from going quadratic


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def shingles(norm: str) -> frozenset[str]:
    """The character 5-grams of ``norm`` (the text itself when it is shorter)."""
    return frozenset(norm[i:i + SHINGLE] for i in range(max(1, len(norm) - SHINGLE + 1)))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a & b| / |a | b|."""
    common = len(a & b)
    return common / (len(a) + len(b) - common)


class NearDuplicateIndex:
    """Texts added so far, queried for an equal or near (Jaccard >= 0.9) one; ids are caller-chosen ints
    (line numbers), and a query names the earliest added match, so the answer is the same on every run."""

    def __init__(self) -> None:
        self.exact: dict[str, int] = {}
        self.shingles: list[frozenset[str]] = []
        self.ids: list[int] = []
        self.lsh = MinHashLSH(num_perm=_PERMS, params=(_BANDS, _ROWS))
        # one MinHash, cleared per text: the LSH keeps band hashes, not the object, and a new MinHash (or a
        # copy) re-draws or re-checks its 128 permutations, ~0.4 ms a text
        self._minhash = MinHash(num_perm=_PERMS, seed=_SEED)
        self._last: tuple[str, frozenset[str]] | None = None

    def _sketch(self, norm: str) -> tuple[frozenset[str], MinHash]:
        """Shingles and MinHash; the last pair is kept since add() follows query() on one text."""
        if self._last is None or self._last[0] != norm:
            mine = shingles(norm)
            self._minhash.clear()
            self._minhash.update_batch(s.encode("utf-8") for s in mine)
            self._last = (norm, mine)
        return self._last[1], self._minhash

    def query(self, text: str) -> int | None:
        """The id of an earlier text that ``text`` equals or nearly duplicates (the first added), else None."""
        norm = normalize(text)
        if norm in self.exact:
            return self.exact[norm]
        if not self.shingles:
            return None
        mine, sketch = self._sketch(norm)
        for slot in sorted(self.lsh.query(sketch))[:_MAX_CANDIDATES]:
            if jaccard(mine, self.shingles[slot]) >= NEAR_THRESHOLD:
                return self.ids[slot]
        return None

    def add(self, text: str, ident: int) -> None:
        norm = normalize(text)
        if norm in self.exact:
            return
        self.exact[norm] = ident
        mine, sketch = self._sketch(norm)
        slot = len(self.shingles)
        self.shingles.append(mine)
        self.ids.append(ident)
        self.lsh.insert(slot, sketch)
