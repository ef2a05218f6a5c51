"""Generate the bundled dataset, `data/bundled/train.jsonl`: small, regular character-level tasks.

    python data/generate_bundled.py            # rewrites data/bundled/train.jsonl byte-identically
    python data/generate_bundled.py --out F    # writes F instead

Alpaca rows (`instruction`, `input`, `output`) of tasks a character-level model can learn from a
few hundred examples: reversing, upper- and lower-casing, sorting words, adding small numbers,
counting letters, spelling out, repeating. Each task has one fixed instruction, so the structure
is regular and an adapter's eval loss visibly drops within ~100 steps. Every row renders (with the
engine's alpaca template, ~46 characters) to well under 128 characters.

Determinism: only `random.Random.random()` is used (its output for a seed is guaranteed across
Python versions; `choice`/`shuffle`/`randint` are not), and the JSON is written with fixed
separators and "\n" line ends. Stdlib only, so it runs without the project installed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240611
N_ROWS = 3000
MAX_CHARS = 64  # instruction + input + output; keeps the rendered example well under 128 chars
OUT = Path(__file__).resolve().parent / "bundled" / "train.jsonl"

WORDS = (
    "ant ape arm art bag bat bed bee box boy bus cap car cat cow cup day dog ear egg elf eye fan "
    "fig fox gem hat hen ice ink jam jar jet key kid kit leg lid map mat mud net nut oak owl pan "
    "pen pig pin pot rat ray rug sea sun tea toe toy van web wig yak zip "
    "apple bread chair cloud dance eagle flame grape honey igloo jelly knife lemon mango night "
    "ocean piano queen river snake tiger umbra vivid whale xenon yacht zebra amber basil cedar "
    "delta ember frost glove haven ivory jolly koala lilac maple noble olive pearl quilt robin "
    "stone tulip unity vapor wheat young"
).split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"


class _Rng:
    """Integer draws built on `random()` alone, whose stream is stable across Python versions."""

    def __init__(self, seed: int) -> None:
        self._r = random.Random(seed)

    def below(self, n: int) -> int:
        return min(int(self._r.random() * n), n - 1)

    def between(self, lo: int, hi: int) -> int:
        return lo + self.below(hi - lo + 1)

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def sample(self, seq, k: int) -> list:
        pool = list(seq)
        for i in range(k):  # partial Fisher-Yates
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]

    def letters(self, lo: int, hi: int) -> str:
        return "".join(self.choice(LETTERS) for _ in range(self.between(lo, hi)))


def _reverse(g: _Rng) -> tuple[str, str, str]:
    s = g.letters(3, 8)
    return "Reverse the string.", s, s[::-1]


def _upper(g: _Rng) -> tuple[str, str, str]:
    s = " ".join(g.sample(WORDS, g.between(1, 3)))
    return "Convert to uppercase.", s, s.upper()


def _lower(g: _Rng) -> tuple[str, str, str]:
    s = " ".join(g.sample(WORDS, g.between(1, 3))).upper()
    return "Convert to lowercase.", s, s.lower()


def _sort(g: _Rng) -> tuple[str, str, str]:
    words = g.sample(WORDS, g.between(3, 4))
    return "Sort the words.", " ".join(words), " ".join(sorted(words))


def _add(g: _Rng) -> tuple[str, str, str]:
    a, b = g.between(0, 99), g.between(0, 99)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


def _count(g: _Rng) -> tuple[str, str, str]:
    s = g.letters(2, 9)
    return "Count the letters.", s, str(len(s))


def _spell(g: _Rng) -> tuple[str, str, str]:
    s = g.letters(3, 6)  # no input: exercises the template without an input section
    return f"Spell {s} with dashes.", "", "-".join(s)


def _repeat(g: _Rng) -> tuple[str, str, str]:
    s = g.choice(WORDS)
    return "Repeat the word three times.", s, " ".join([s] * 3)


def _next(g: _Rng) -> tuple[str, str, str]:
    n = g.between(0, 998)
    return f"What number comes after {n}?", "", str(n + 1)


def _first_letters(g: _Rng) -> tuple[str, str, str]:
    words = g.sample(WORDS, g.between(3, 4))
    return "First letter of each word.", " ".join(words), "".join(w[0] for w in words)


TASKS = (_reverse, _upper, _lower, _sort, _add, _count, _spell, _repeat, _next, _first_letters)


def generate(n_rows: int = N_ROWS, seed: int = SEED) -> list[dict]:
    """`n_rows` alpaca rows, the tasks interleaved in a fixed seeded order; equal for equal args."""
    g = _Rng(seed)
    rows = []
    for _ in range(n_rows):
        instruction, inp, out = g.choice(TASKS)(g)
        if len(instruction) + len(inp) + len(out) > MAX_CHARS:
            raise AssertionError(f"row too long for the tiny model: {instruction!r} {inp!r}")
        rows.append({"instruction": instruction, "input": inp, "output": out})
    return rows


def write(path: Path, rows: list[dict]) -> None:
    """Write `rows` as JSONL with a byte-stable encoding."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=True, separators=(", ", ": ")) + "\n" for r in rows)
    path.write_bytes(text.encode("ascii"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output file (default {OUT})")
    args = parser.parse_args(argv)
    rows = generate()
    write(args.out, rows)
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
