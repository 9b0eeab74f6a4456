"""The tokenizer, written as GGUF keys so llama.cpp splits text exactly as the HF tokenizer does.

Three shapes of tokenizer reach us:

- ``tokenizer.json`` with a byte-level BPE (GPT-2 style: Llama 3, Qwen, SmolLM): tokens, merges
  and the *pre-tokenizer*, the regex that cuts text into words before BPE. llama.cpp has its own
  copy of each known regex under a name; we identify ours by reading the pre-tokenizer's
  definition (not by hashing sample output), and refuse one we cannot name rather than write a
  model that tokenizes differently from the original.
- ``tokenizer.json`` with a SentencePiece-style BPE (``▁`` for spaces, byte fallback: Llama 2,
  Gemma, Mistral): llama.cpp's SentencePiece tokenizer merges by score, so a token's score is
  minus the rank of the merge that makes it.
- only ``tokenizer.model``: read with the ``sentencepiece`` library, scores and types as stored.

Special tokens, add_bos/add_eos and the chat template come through gguf's own SpecialVocab.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from edgellm.errors import CheckpointError

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: the pre-tokenizer steps, as read from tokenizer.json, -> llama.cpp's name for that regex
PRE_TOKENIZERS: dict[tuple[tuple, ...], str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    pre: str | None = None
    add_space_prefix: bool | None = None
    #: whether text starts with BOS when the tokenizer files do not say (HF's fast tokenizers add
    #: it only through their post-processor; the old SentencePiece LlamaTokenizer always did)
    add_bos_default: bool = False

    def add_to(self, writer: gguf.GGUFWriter, folder: Path) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        _check_template(folder)
        special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(self.tokens))
        # llama.cpp guesses add_bos per vocabulary type when the file is silent: never leave it so
        special.add_special_token.setdefault("bos", self.add_bos_default)
        special.add_special_token.setdefault("eos", False)
        special.add_to_gguf(writer, quiet=True)


def _check_template(folder: Path) -> None:
    """gguf-py drops a chat template of the wrong kind with a warning, leaving a model that answers
    through the fallback template without a word: refuse it instead."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except RecursionError:
        raise CheckpointError(f"cannot read {path.name}: nested too deeply") from None
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {path.name}: {exc}") from None
    named = isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in template)
    if template is not None and not isinstance(template, str) and not named:
        raise CheckpointError(f"{path.name}: chat_template is {type(template).__name__}, not a template")


def _steps(pre: dict[str, Any] | None) -> tuple[tuple, ...]:
    """The pre-tokenizer as (kind, the setting that changes how text is cut) steps."""
    if not pre:
        return ()
    if pre.get("type") == "Sequence":
        return tuple(s for p in pre.get("pretokenizers", []) for s in _steps(p))
    kind = pre.get("type")
    if kind == "ByteLevel":
        return ((kind, bool(pre.get("use_regex", True))),)
    if kind == "Digits":
        return ((kind, bool(pre.get("individual_digits", False))),)
    if kind == "Split":
        pattern = pre.get("pattern", {})
        return ((kind, pattern.get("Regex", pattern.get("String"))),)
    return ((kind, json.dumps(pre, sort_keys=True)),)


def _is_sentencepiece_style(tok: dict[str, Any]) -> bool:
    text = json.dumps([tok.get("normalizer"), tok.get("pre_tokenizer"), tok.get("decoder")])
    return bool(tok["model"].get("byte_fallback")) or "\\u2581" in text or "▁" in text


def _adds_space_prefix(tok: dict[str, Any]) -> bool:
    text = json.dumps([tok.get("normalizer"), tok.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text or '"prepend_scheme": "first"' in text


def _base_tokens(tok: dict[str, Any], n_vocab: int, sentencepiece: bool) -> tuple[list[str], list[int]]:
    vocab: dict[str, int] = tok["model"]["vocab"]
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    by_id.update({i: a["content"] for i, a in added.items()})
    if by_id and max(by_id) >= n_vocab:
        raise CheckpointError(
            f"the tokenizer has token id {max(by_id)} but the model's embedding has only {n_vocab} rows"
        )
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = by_id[i]
        if i in added and added[i].get("special"):
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            # llama.cpp matches user-defined tokens in the raw text, where spaces are still spaces
            types.append(gguf.TokenType.USER_DEFINED)
            text = text.replace("\u2581", " ") if sentencepiece else text
        elif sentencepiece and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    return tokens, types


def _merges(tok: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]


def from_tokenizer_json(path: Path, n_vocab: int) -> Vocab:
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        kind = tok["model"]["type"]
    except RecursionError:
        raise CheckpointError(f"cannot read {path.name}: nested too deeply") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read {path.name}: {exc}") from None
    if kind != "BPE":
        raise CheckpointError(f"{path.name} holds a {kind} tokenizer; edgellm converts BPE and SentencePiece ones")
    merges = _merges(tok)
    if _is_sentencepiece_style(tok):
        tokens, types = _base_tokens(tok, n_vocab, sentencepiece=True)
        # llama.cpp's SentencePiece tokenizer merges the best-scored pair first: rank -> score
        rank = {}
        for r, merge in enumerate(merges):
            rank.setdefault(merge.replace(" ", "", 1), r)
        scores = [-float(rank.get(t, len(merges))) if ty == gguf.TokenType.NORMAL else 0.0
                  for t, ty in zip(tokens, types)]
        return Vocab("llama", tokens, types, scores=scores, add_space_prefix=_adds_space_prefix(tok))
    steps = _steps(tok.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(steps)
    if pre is None or tok.get("normalizer"):
        raise CheckpointError(
            f"{path.name} splits text in a way edgellm does not know how to reproduce in llama.cpp "
            f"(pre-tokenizer {[s[0] for s in steps]}); converting it would tokenize differently",
            hint="known: " + ", ".join(sorted(PRE_TOKENIZERS.values())),
        )
    tokens, types = _base_tokens(tok, n_vocab, sentencepiece=False)
    return Vocab("gpt2", tokens, types, merges=merges, pre=pre)


def from_sentencepiece(path: Path, n_vocab: int) -> Vocab:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        from edgellm.errors import MissingDependencyError

        raise MissingDependencyError(
            f"{path.parent.name} ships only tokenizer.model, which needs the sentencepiece package",
            hint="pip install sentencepiece",
        ) from None
    sp = SentencePieceProcessor()
    if not sp.Load(str(path)):
        raise CheckpointError(f"cannot read {path.name} as a SentencePiece model")
    probe = "a\n\n  b\tc"
    if sp.decode(sp.encode(probe)) != probe:
        raise CheckpointError(
            f"{path.name} normalizes text (NFKC or collapsed whitespace), which llama.cpp's SentencePiece "
            "tokenizer does not do: the converted model would tokenize differently",
        )
    if sp.vocab_size() > n_vocab:
        raise CheckpointError(
            f"{path.name} has {sp.vocab_size()} tokens but the model's embedding has only {n_vocab} rows"
        )
    tokens, types, scores = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(
            gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
            else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
            else gguf.TokenType.NORMAL
        )
    added = path.parent / "added_tokens.json"
    extra = json.loads(added.read_text(encoding="utf-8")) if added.is_file() else {}
    for i in range(sp.vocab_size(), n_vocab):
        tokens.append(next((t for t, j in extra.items() if j == i), f"[PAD{i}]"))
        scores.append(-1000.0)
        types.append(gguf.TokenType.USER_DEFINED if tokens[-1] in extra else gguf.TokenType.UNUSED)
    dummy_prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")
    return Vocab("llama", tokens, types, scores=scores, add_space_prefix=dummy_prefix, add_bos_default=True)


def read_vocab(folder: Path, n_vocab: int) -> Vocab:
    """The checkpoint's tokenizer for an embedding of ``n_vocab`` rows."""
    if (folder / "tokenizer.json").is_file():
        return from_tokenizer_json(folder / "tokenizer.json", n_vocab)
    if (folder / "tokenizer.model").is_file():
        return from_sentencepiece(folder / "tokenizer.model", n_vocab)
    raise CheckpointError(f"{folder} has no tokenizer.json or tokenizer.model")
