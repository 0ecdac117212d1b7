"""The shipped model's corpus: the Python standard library's own source files (on every machine
with Python), a deterministic train / held-out split by file, and the byte-level BPE tokenizer
trained on the training files with the `tokenizers` library.

Byte-level BPE is lossless (no normalizer): the bytes of a text are the bytes of its tokens, which
is what turns a loss in nats per token into nats per byte (dsv3.evaluate.token_bytes: evaluation
needs it for any text, so it lives with the evaluation, not here).
"""

import sysconfig
import zlib
from pathlib import Path

import torch

# DeepSeek-V3's special tokens, at ids 0 and 1 as in its tokenizer (config: bos 0, eos 1).
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# Folders left out: installed packages, test suites (mostly data tables and fixtures), docs data.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(rel_path: str, every: int = 20) -> bool:
    """One file in `every` (by a CRC of its path relative to the stdlib root) is held out: the
    split does not depend on the file list, the machine or the Python version's other files."""
    return zlib.crc32(rel_path.encode()) % every == 0


def stdlib_files(root: Path | None = None):
    """[(relative path, text)] of the standard library's .py files, sorted by path; files that are
    not UTF-8 are skipped."""
    root = root or stdlib_root()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]):
            continue
        try:
            out.append((rel.as_posix(), p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def split(files, every: int = 20):
    """files [(path, text)] -> (train texts, held-out texts)."""
    train = [t for p, t in files if not is_heldout(p, every)]
    heldout = [t for p, t in files if is_heldout(p, every)]
    return train, heldout


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` with BOS/EOS at ids 0/1, trained on texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_documents(tokenizer, texts, bos: int, eos: int) -> torch.Tensor:
    """One int32 stream of [bos] + tokens + [eos] per text, in order."""
    parts = [torch.tensor([bos] + e.ids + [eos], dtype=torch.int32)
             for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)
