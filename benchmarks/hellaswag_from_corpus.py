"""A HellaSwag-format file from a plain-text corpus, for `ml-playground evaluate` where the real
validation set cannot be downloaded (an offline machine) or for a corpus of your own.

The examples come from the corpus's last `--held_out` share (tinyshakespeare's validation
split with the default 0.1: text a model trained on the first 90% never saw). Each takes two
consecutive lines of verse: the context is the first line and the first half of the second,
the right ending the second half; the three wrong endings are second halves of other lines of
that share, drawn with a fixed seed. Lines that name a speaker (`KING RICHARD II:`) are left out.

    uv run python benchmarks/hellaswag_from_corpus.py ../shared/data/tinyshakespeare/input.txt \
        --examples 1000 --output hellaswag_shakespeare.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path


def verse(line: str) -> bool:
    return len(line.split()) >= 4 and not line.rstrip().endswith(":")


def halves(line: str) -> tuple[str, str]:
    words = line.split()
    return " ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2 :])


def examples(text: str, count: int, held_out: float = 0.1, seed: int = 1337) -> list[dict]:
    """Up to `count` examples in the order of the text (fewer if the share has fewer pairs)."""
    rng = random.Random(seed)
    lines = text[int(len(text) * (1 - held_out)) :].splitlines()[1:]  # from a whole line
    pool = [halves(line)[1] for line in lines if verse(line)]
    out: list[dict] = []
    for first, second in itertools.pairwise(lines):
        if len(out) == count:
            break
        if not (verse(first) and verse(second)):
            continue
        start, right = halves(second)
        wrong: list[str] = []
        while len(wrong) < 3:
            ending = rng.choice(pool)
            if ending != right and ending not in wrong:
                wrong.append(ending)
        label = rng.randrange(4)
        endings = [*wrong[:label], right, *wrong[label:]]
        out.append({"ind": len(out), "ctx": f"{first}\n{start}", "endings": endings,
                    "label": label})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--held_out", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    text = args.corpus.read_text(encoding="utf-8")
    found = examples(text, args.examples, args.held_out, args.seed)
    args.output.write_text("".join(json.dumps(e) + "\n" for e in found), encoding="utf-8")
    print(f"wrote {len(found)} examples to {args.output}")


if __name__ == "__main__":
    main()
