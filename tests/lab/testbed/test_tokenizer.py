import pytest

from kvpolicy.lab.testbed.tokenizer import REPEAT, VOCAB, build_tokenizer, save_tokenizer, vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_vocabulary_is_small_and_unique():
    vocab = vocabulary()
    assert len(vocab) == len(set(vocab)) == VOCAB.size
    assert VOCAB.size < 1024


def test_round_trip(tokenizer):
    text = "w3 k17 v42 . w500 <repeat> w3 k17 <q> k17"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.split())
    assert tokenizer.decode(ids) == text


def test_bos_is_prepended_and_specials_are_single_tokens(tokenizer):
    ids = tokenizer("w1 w2")["input_ids"]
    assert ids[0] == VOCAB.bos == tokenizer.bos_token_id
    assert tokenizer.convert_tokens_to_ids(REPEAT) == VOCAB.repeat
    assert tokenizer.eos_token_id == VOCAB.eos and tokenizer.pad_token_id == VOCAB.pad


def test_unknown_words_map_to_unk(tokenizer):
    assert tokenizer("hello", add_special_tokens=False)["input_ids"] == [VOCAB.unk]


def test_saved_tokenizer_loads_with_auto_tokenizer(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = "k5 v7 . <q> k5"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
