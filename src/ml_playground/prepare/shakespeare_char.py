"""nanoGPT's ``shakespeare_char`` preparer: a character vocabulary over the whole text.

Split and token counts match nanoGPT exactly (tinyshakespeare: vocab 65, 1,003,854 / 111,540).
"""

from __future__ import annotations

from pathlib import Path

from ml_playground.errors import DataError
from ml_playground.prepare.artifacts import prepare_text
from ml_playground.prepare.tokenizers import CharTokenizer

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def prepare_char_corpus(
    text: str, out_dir: Path, val_fraction: float, *, source: str = "corpus"
) -> dict:
    """Build a char vocabulary over all of ``text``, split it 1-val/val and write the artifacts."""
    if not text:
        raise DataError(f"{source} is empty; give a non-empty UTF-8 text corpus")
    tokenizer = CharTokenizer.from_text(text)
    return prepare_text(text, tokenizer, out_dir, val_fraction, source=source)
