import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny tokenizer/policy/critic/reward models, built once per test session."""
    from rayrlhf.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_models"))
