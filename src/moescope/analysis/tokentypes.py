"""Python token types (keyword, name, string, ...) for the model's tokens of a code text.

Layer 1 (pure computation): a text and character offsets in, one type per model
token out. The Python side is the standard library's ``tokenize``; the model side
is the fast tokenizer's offset mapping. The two are joined character by
character: each character gets the type of the Python token covering it, and a
model token takes the type most of its characters have (the Python token it
overlaps most). Whitespace between tokens on a line does not vote, so " def"
is a keyword and " =" an operator; leading whitespace of a line counts as
indentation even where ``tokenize`` emits no INDENT token (every line after the
first of an indented block).

Code that does not tokenize to the end (a truncated file, an unclosed bracket,
bad dedent) keeps the types of everything read before the error; the rest is
"other".
"""

from __future__ import annotations

import io
import keyword
import token as token_module
import tokenize
from collections.abc import Sequence

import numpy as np

TOKEN_TYPES: tuple[str, ...] = (
    "keyword",
    "name",
    "number",
    "operator",
    "string",
    "comment",
    "indentation",  # INDENT/DEDENT, NEWLINE/NL and a line's leading whitespace
    "other",
)
KEYWORD, NAME, NUMBER, OPERATOR, STRING, COMMENT, INDENTATION, OTHER = range(len(TOKEN_TYPES))
_NO_VOTE = -1  # whitespace between tokens on a line

_STRING_PARTS = {token_module.STRING}
for _name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"):  # Python >= 3.12 splits f-strings
    if hasattr(token_module, _name):
        _STRING_PARTS.add(getattr(token_module, _name))
_LAYOUT = {token_module.INDENT, token_module.DEDENT, token_module.NEWLINE, token_module.NL}


def _python_type(tok: tokenize.TokenInfo) -> int:
    if tok.type == token_module.NAME:
        return KEYWORD if keyword.iskeyword(tok.string) else NAME
    if tok.type == token_module.NUMBER:
        return NUMBER
    if tok.type == token_module.OP:
        return OPERATOR
    if tok.type in _STRING_PARTS:
        return STRING
    if tok.type == token_module.COMMENT:
        return COMMENT
    if tok.type in _LAYOUT:
        return INDENTATION
    return OTHER


def character_types(code: str) -> np.ndarray:
    """Type id of every character of ``code`` [len(code)] (int8; -1 = whitespace between tokens)."""
    lines = io.StringIO(code).readlines()
    line_start = np.concatenate([[0], np.cumsum([len(line) for line in lines])]).astype(np.int64)
    types = np.full(len(code), _NO_VOTE, dtype=np.int8)
    for row, line in enumerate(lines):
        content = line.rstrip("\r\n")
        indent = len(content) - len(content.lstrip(" \t\f"))
        types[line_start[row] : line_start[row] + indent] = INDENTATION
        types[line_start[row] + len(content) : line_start[row + 1]] = INDENTATION  # the line break

    def offset(row_col: tuple[int, int]) -> int:
        row, col = row_col
        return int(line_start[min(row - 1, len(lines))]) + col

    covered_until = 0
    try:
        for tok in tokenize.generate_tokens(iter(lines).__next__):
            if tok.type == token_module.ENDMARKER:
                break
            start, end = offset(tok.start), offset(tok.end)
            if end > start:
                types[start:end] = _python_type(tok)
            covered_until = max(covered_until, end)
    except (tokenize.TokenError, SyntaxError):
        # Unreadable from here on (SyntaxError covers IndentationError): leave the rest as "other".
        rest = types[covered_until:]
        rest[rest != INDENTATION] = OTHER
    return types


def model_token_types(code: str, offsets: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """Type id of each model token [T] given its (start, end) character offsets into ``code``.

    A token takes its characters' majority type, ignoring whitespace between tokens;
    a token with no voting character (spaces only, special tokens with empty
    offsets) is "other". Byte-level tokenizers with ``trim_offsets`` report a
    token like "\u0120\u0120\u0120x" as covering only "x"; each token's start is
    therefore extended back to the previous token's end, so trimmed whitespace
    still votes (for tiling, untrimmed offsets this changes nothing).
    """
    chars = character_types(code)
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    out = np.full(len(spans), OTHER, dtype=np.int64)
    previous_end = 0
    for t, (start, end) in enumerate(spans):
        if end <= start and start < previous_end:
            continue  # an empty span behind us: a special token
        votes = chars[min(start, previous_end) : end]
        previous_end = max(previous_end, end)
        votes = votes[votes >= 0]
        if votes.size:
            # Ties go to the lower type id (keyword before name before number ...).
            out[t] = int(np.bincount(votes, minlength=len(TOKEN_TYPES)).argmax())
    return out


def token_types_for_text(code: str, tokenizer) -> tuple[list[int], np.ndarray]:
    """Tokenize ``code`` with a fast (offset-mapping) tokenizer: (token ids, type ids)."""
    # verbose=False: a whole file is longer than the model's context; nothing is run on it here
    enc = tokenizer(code, return_offsets_mapping=True, add_special_tokens=False, verbose=False)
    return list(enc["input_ids"]), model_token_types(code, enc["offset_mapping"])


def token_pieces(tokenizer, token_ids) -> list[str]:
    """The text each token adds, so that "".join(pieces) is the decoded text.

    Uses the tokenizers library's streaming decoder: a token that ends inside a
    multi-byte character gets "" and the token that completes it gets the character.
    """
    from tokenizers.decoders import DecodeStream

    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    stream = DecodeStream(skip_special_tokens=False)
    return [stream.step(backend, int(t)) or "" for t in token_ids]


def block_token_types(
    pieces: Sequence[str], token_ids: Sequence[int], eos_token_id: int, *, starts_document: bool
) -> np.ndarray:
    """Python token types [T] for one packed block of code; -1 where no reliable type exists.

    A block is documents joined by EOS and cut at arbitrary points. Each document
    segment is typed on its own; the segment before the first EOS is typed only if
    the block ``starts_document`` (otherwise it is the tail of a document whose
    beginning, and so its string/bracket state, is unknown). EOS tokens get -1.
    """
    ids = np.asarray(token_ids)
    out = np.full(ids.size, -1, dtype=np.int64)
    eos_positions = np.flatnonzero(ids == eos_token_id)
    bounds = np.concatenate([[-1], eos_positions, [ids.size]])
    for n_seg, (a, b) in enumerate(zip(bounds[:-1] + 1, bounds[1:])):
        if b <= a or (n_seg == 0 and not starts_document):
            continue
        segment = list(pieces[a:b])
        ends = np.cumsum([len(p) for p in segment])
        offsets = np.stack([ends - [len(p) for p in segment], ends], axis=1)
        out[a:b] = model_token_types("".join(segment), offsets)
    return out


def stream_token_types(texts: Sequence[str], tokenizer, eos_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and types [S] of texts packed as the data builder packs them (each text + EOS).

    Every text is typed whole, so a block cut from the middle of a document still
    gets the types its tokens have in the full file. EOS tokens get -1.
    """
    ids_parts, type_parts = [], []
    for text in texts:
        ids, types = token_types_for_text(text, tokenizer)
        ids_parts.append(np.asarray(ids + [eos_token_id], dtype=np.int64))
        type_parts.append(np.concatenate([types, [-1]]).astype(np.int64))
    if not ids_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ids_parts), np.concatenate(type_parts)
