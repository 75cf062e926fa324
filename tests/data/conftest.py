import pytest
from dataset_files import plain, templated


@pytest.fixture(scope="session")
def plain_tok(tiny_models):
    """The tiny tokenizer without a chat template: prompts stay raw text."""
    from transformers import AutoTokenizer

    return plain(AutoTokenizer.from_pretrained(tiny_models["policy"]))


@pytest.fixture(scope="session")
def chat_tok(tiny_models):
    """The tiny tokenizer with `dataset_files.CHAT_TEMPLATE`."""
    from transformers import AutoTokenizer

    return templated(AutoTokenizer.from_pretrained(tiny_models["policy"]))
