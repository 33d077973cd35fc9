"""Token offsets against the exact prefix-decoding method, on several tokenizer families.

Families: SmolLM2's byte-level BPE (the ``tokenizer`` fixture), and three built in memory
with ``tokenizers``: a Llama-2 style SentencePiece unigram with byte fallback, one with a
``Metaspace`` decoder, and a BERT-style WordPiece whose decoding cleans up spaces.
"""

from __future__ import annotations

import copy
import random

import pytest
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from nnsteer.modeling.positions import (
    decode_response,
    token_offsets,
    windowed_prefix_lengths,
)

TEXT = (
    "Okay, so I need to find how many apples are left. Wait, maybe I'm wrong: "
    "24 - 9 = 15, isn't it? Café, naïve, Ελληνικά, déjà vu! 日本語の文章です。"
    "Emoji 😀🎉👨‍👩‍👧 and 🤔 ... Let me check again; it's (probably) 15.\n\n"
    "Hmm — “quotes” and ‘single’ ones, €100, 1.5 × 10⁹, ∑ x² ≥ 0. "
)
WORDS = sorted(set(TEXT.split()) | {"a", "the", "so", "is", "it", "and", "s", "t", "m"})


def reference_offsets(tokenizer, output_ids) -> list[tuple[int, int]]:
    """The prefix method: decode every prefix, running minimum from the end; a token that
    turns the previous prefix's trailing U+FFFD into a real character also covers it."""
    ids = list(output_ids)
    prefixes = [decode_response(tokenizer, ids[: i + 1]) for i in range(len(ids))]
    ends = [len(p) for p in prefixes]
    for i in range(len(ends) - 2, -1, -1):
        ends[i] = min(ends[i], ends[i + 1])
    text = decode_response(tokenizer, ids)
    offsets = []
    for i, end in enumerate(ends):
        start = ends[i - 1] if i else 0
        if (i and prefixes[i - 1].endswith("\ufffd") and ids[i] not in tokenizer.all_special_ids
                and start and text[start - 1] != "\ufffd"):
            start -= 1
        offsets.append((start, end))
    return offsets


def wrap(backend: Tokenizer, **specials) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def unigram_with_byte_fallback() -> models.Unigram:
    """Whole words, ASCII characters and the 256 byte pieces: other characters fall back to bytes."""
    ascii_chars = [chr(c) for c in range(33, 127)]
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("<pad>", 0.0)]
    vocab += [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    vocab += [("▁", -2.0)] + [(c, -5.0) for c in ascii_chars] + [("▁" + c, -5.0) for c in ascii_chars]
    vocab += [("▁" + w, -3.0) for w in WORDS if w.isascii() and len(w) > 1]
    return models.Unigram(vocab, unk_id=0, byte_fallback=True)


SENTENCEPIECE_SPECIALS = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(scope="module")
def llama_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2 style: ``▁`` prepended by the normalizer, one leading space stripped on decoding."""
    backend = Tokenizer(unigram_with_byte_fallback())
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    return wrap(backend, **SENTENCEPIECE_SPECIALS)


@pytest.fixture(scope="module")
def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """``Metaspace`` pre-tokenizer and decoder, which strips the space of a decoding's first token."""
    backend = Tokenizer(unigram_with_byte_fallback())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")])
    return wrap(backend, **SENTENCEPIECE_SPECIALS)


@pytest.fixture(scope="module")
def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """BERT style: words joined with spaces, ``##`` continuations, ``clean_up_tokenization_spaces``."""
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    backend.train_from_iterator([TEXT] * 20, trainer)
    tok = wrap(backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
               clean_up_tokenization_spaces=True)
    assert tok.decode(tok.encode("I'm sure , isn't it .", add_special_tokens=False)) == "i'm sure, isn't it."
    return tok


FAMILIES = ["tokenizer", "llama_tokenizer", "metaspace_tokenizer", "wordpiece_tokenizer"]


@pytest.fixture(params=FAMILIES)
def any_tokenizer(request):
    return request.getfixturevalue(request.param)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def check(tokenizer, ids: list[int], windowed: bool = True) -> list[tuple[int, int]]:
    """``token_offsets`` equals the reference and keeps its promises; ``windowed``: no fallback."""
    offsets = token_offsets(tokenizer, ids)
    assert offsets == reference_offsets(tokenizer, ids)
    if ids:
        assert offsets[0][0] == 0 and offsets[-1][1] == len(decode_response(tokenizer, ids))
        assert all(s <= e for s, e in offsets)
        assert all(b[0] in (a[1], a[1] - 1) for a, b in zip(offsets, offsets[1:]))
    assert (windowed_prefix_lengths(tokenizer, ids) is not None) == windowed
    return offsets


def test_text_with_split_characters(any_tokenizer):
    ids = encode(any_tokenizer, TEXT * 3)
    check(any_tokenizer, ids)


@pytest.mark.parametrize("family", ["tokenizer", "llama_tokenizer"])
def test_prefixes_end_inside_characters(family, request):
    """The texts do split characters across byte tokens: some prefixes decode to U+FFFD."""
    tok = request.getfixturevalue(family)
    ids = encode(tok, TEXT)
    partial = [i for i in range(len(ids)) if decode_response(tok, ids[: i + 1]).endswith("\ufffd")]
    assert len(partial) >= 5
    offsets = check(tok, ids)
    shared = [i for i in range(1, len(ids)) if offsets[i][0] == offsets[i - 1][1] - 1]
    assert len(shared) >= 5  # completing tokens share the character with the token before
    assert all(s < e for s, e in offsets)  # and no token of the text is left out


def test_special_tokens_inside_and_at_the_end(any_tokenizer):
    tok = any_tokenizer
    ids = encode(tok, TEXT)
    specials = [t for t in (tok.eos_token_id, tok.sep_token_id, tok.pad_token_id, tok.bos_token_id,
                            tok.cls_token_id) if t is not None]
    rng = random.Random(1)
    mixed = list(ids)
    for _ in range(25):
        mixed.insert(rng.randrange(len(mixed) + 1), rng.choice(specials))
    check(tok, mixed)
    check(tok, [specials[-1]] * 3 + ids + [specials[0]] + [tok.pad_token_id] * 400)
    check(tok, [tok.pad_token_id] * 5)


@pytest.mark.parametrize("ids", [[], [0]], ids=["empty", "one token"])
def test_tiny_inputs(any_tokenizer, ids):
    check(any_tokenizer, ids)


def test_long_chains(any_tokenizer):
    tok = any_tokenizer
    ids = encode(tok, TEXT * 200)[:3000]
    assert len(ids) == 3000
    check(tok, ids)


def test_random_ids(any_tokenizer):
    """Random ids: invalid byte sequences, specials and added tokens anywhere."""
    rng = random.Random(0)
    ids = [rng.randrange(len(any_tokenizer)) for _ in range(3000)]
    assert token_offsets(any_tokenizer, ids) == reference_offsets(any_tokenizer, ids)


def test_random_text_pieces(any_tokenizer):
    """Many short chains cut at arbitrary tokens, with specials between them."""
    tok = any_tokenizer
    ids = encode(tok, TEXT * 4)
    rng = random.Random(2)
    for _ in range(40):
        start = rng.randrange(len(ids))
        chain = ids[start : start + rng.randrange(1, 60)]
        chain.insert(rng.randrange(len(chain) + 1), tok.pad_token_id)
        assert token_offsets(tok, chain) == reference_offsets(tok, chain)


def test_falls_back_when_the_text_never_settles(tokenizer):
    """Hundreds of lone lead bytes: every window ends in U+FFFD, so the exact method runs."""
    lead = tokenizer.convert_tokens_to_ids("â")  # byte 0xE2 alone
    ids = encode(tokenizer, "Okay, ") + [lead] * 300 + encode(tokenizer, " so done.")
    check(tokenizer, ids, windowed=False)


def test_falls_back_when_a_byte_run_longer_than_the_look_back_turns_invalid(llama_tokenizer):
    """Byte fallback decodes a run of byte pieces as a whole: a bad last byte turns the
    already committed characters of the run into U+FFFD, and the exact method runs."""
    tok = llama_tokenizer
    head, e_acute, tail = encode(tok, "so the answer is"), encode(tok, "éééééé"), encode(tok, " it is")
    assert len(e_acute) == 13 and e_acute[1:] == tok.convert_tokens_to_ids(["<0xC3>", "<0xA9>"]) * 6
    lead = tok.convert_tokens_to_ids("<0xE2>")
    ids = head + e_acute + [lead] + tail
    assert decode_response(tok, ids).count("\ufffd") == 13
    check(tok, ids, windowed=False)
    check(tok, head + e_acute + tail)  # a valid run: no fallback


def test_clean_up_across_tokens(tokenizer):
    """A byte-level BPE forced to clean up spaces: ``"a " + "."`` decodes to ``"a."``, so
    the decoded prefix ending in the space is not a prefix of the response."""
    tok = copy.deepcopy(tokenizer)
    tok.clean_up_tokenization_spaces = True
    tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    space, dot = tok.convert_tokens_to_ids(["Ġ", "."])
    ids = encode(tok, "Okay so the answer is") + [space, dot] + encode(tok, " Wait, isn't it 5 ?")
    assert decode_response(tok, ids).startswith("Okay so the answer is. Wait, isn't it 5?")
    check(tok, ids)
    check(tok, encode(tok, TEXT))
