"""Python token types aligned to model tokens, on hand-checked snippets."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from moescope.analysis import tokentypes as tt

K, N, NUM, OP, S, C, IND, O = range(8)

CODE = 'def f(x):\n    """doc\n    more"""\n    return x + 1  # hi é\n'


def byte_level_tokenizer(trim_offsets: bool) -> PreTrainedTokenizerFast:
    """A small GPT-2-style byte-level BPE trained in memory (no hub)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    corpus = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os\n# comment here\n"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def char_string(code: str) -> str:
    """One letter per character: K keyword, N name, 9 number, O operator, S string, C comment, I indentation, ? other, _ gap."""
    letters = "KN9OSCI?"
    return "".join("_" if t < 0 else letters[t] for t in tt.character_types(code))


def test_character_types_by_hand() -> None:
    code = "if x:\n    y = 'a'  # c\n    z = 2.5\n"
    #       if_x:\n  ____y_=_'a'__#_c\n ____z_=_2.5\n
    expected = "KK_NOI" + "IIIIN_O_SSS__CCCI" + "IIIIN_O_999I"
    assert char_string(code) == expected


def test_multiline_string_and_comment_by_hand() -> None:
    code = 'x = """a\n  b\n"""  # end\n'
    # the whole triple-quoted string, line breaks and leading spaces included, is a string
    assert char_string(code) == "N_O_" + "SSSSS" + "SSSS" + "SSS" + "__" + "CCCCC" + "I"
    # a string literal containing '#' is not a comment, a comment containing quotes is not a string
    assert char_string("s = '#'  # 'q'\n") == "N_O_SSS__CCCCCI"


def test_keywords_and_soft_keywords() -> None:
    # 'match' is a soft keyword: a name when used as one
    assert char_string("match = None\n") == "NNNNN_O_KKKKI"
    assert char_string("for i in range(3): pass\n") == "KKK_N_KK_NNNNNO9OO_KKKKI"


def test_unreadable_code_keeps_what_was_read() -> None:
    # unterminated triple-quoted string: tokens before it keep their types, the rest
    # (from the space after "=" on) is "other", except line breaks
    assert char_string('x = 1\ny = """abc\n') == "N_O_9I" + "N_O" + "???????" + "I"
    # unclosed bracket at EOF: the names inside were read before the error
    types = char_string("f(a,\n")
    assert types.startswith("NONO")
    # bad dedent (IndentationError) does not raise
    assert char_string("if x:\n    a\n  b\n")[:6] == "KK_NOI"


def test_model_token_types_from_offsets() -> None:
    code = "x = 10  # n\n"
    # tokens: "x", " =", " 10", "  ", "#", " n", "\n", and an empty special token
    offsets = [(0, 1), (1, 3), (3, 6), (6, 8), (8, 9), (9, 11), (11, 12), (0, 0)]
    assert tt.model_token_types(code, offsets).tolist() == [N, OP, NUM, O, C, C, IND, O]


@pytest.mark.parametrize("trim_offsets", [False, True])
def test_alignment_with_a_fast_tokenizer(trim_offsets: bool) -> None:
    tokenizer = byte_level_tokenizer(trim_offsets)
    ids, types = tt.token_types_for_text(CODE, tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    # hand-checked: (token, type) for the snippet; G = leading space in byte-level BPE
    expected = [
        ("def", K), ("Ġf", N), ("(", OP), ("x", N), ("):", OP),
        ("ĊĠĠĠ", IND), ("Ġ", IND),  # line break + indentation before the docstring
        ('"', S), ('"', S), ('"', S), ("d", S), ("o", S), ("c", S),
        ("ĊĠĠĠ", S), ("Ġ", S),  # the docstring's own line break and indentation
        ("m", S), ("o", S), ("re", S), ('"', S), ('"', S), ('"', S),
        ("ĊĠĠĠ", IND), ("Ġreturn", K), ("Ġx", N), ("Ġ+", OP), ("Ġ1", NUM),
        ("Ġ", O), ("Ġ", O),  # spaces before the comment
        ("#", C), ("Ġ", C), ("h", C), ("i", C), ("Ġ", C), ("Ã", C), ("©", C),  # é is two bytes
        ("Ċ", IND),
    ]
    assert list(zip(pieces, types.tolist())) == expected
    assert [tt.TOKEN_TYPES[t] for t in types[:3]] == ["keyword", "name", "operator"]


def test_token_pieces_rebuild_the_text() -> None:
    tokenizer = byte_level_tokenizer(False)
    ids = tokenizer(CODE, add_special_tokens=False)["input_ids"]
    pieces = tt.token_pieces(tokenizer, ids)
    assert "".join(pieces) == CODE
    assert len(pieces) == len(ids)
    i = pieces.index("é")  # the two-byte character: first byte token gives "", the second the character
    assert pieces[i - 1] == ""


def test_block_token_types_skip_document_tails() -> None:
    tokenizer = byte_level_tokenizer(False)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tail = tokenizer('doc"""\nx = 1\n', add_special_tokens=False)["input_ids"]  # inside a docstring
    head = tokenizer("def f(x):\n", add_special_tokens=False)["input_ids"]
    ids = tail + [eos] + head
    pieces = tt.token_pieces(tokenizer, ids)
    types = tt.block_token_types(pieces, ids, eos, starts_document=False)
    assert (types[: len(tail) + 1] == -1).all()  # unknown tail and the EOS
    assert types[len(tail) + 1 :].tolist() == tt.token_types_for_text("def f(x):\n", tokenizer)[1].tolist()
    typed_from_start = tt.block_token_types(pieces, ids, eos, starts_document=True)
    assert typed_from_start[0] != -1 and typed_from_start[len(tail)] == -1


def test_stream_token_types_pack_like_the_builder() -> None:
    tokenizer = byte_level_tokenizer(False)
    texts = [CODE, "import os\n"]
    ids, types = tt.stream_token_types(texts, tokenizer, eos_token_id=0)
    first_ids, first_types = tt.token_types_for_text(CODE, tokenizer)
    n = len(first_ids)
    assert ids[:n].tolist() == first_ids and ids[n] == 0 and types[n] == -1
    assert types[:n].tolist() == first_types.tolist()
    assert types[n + 1 :].tolist() == [K, N, IND, -1]  # import, " os", newline, EOS
