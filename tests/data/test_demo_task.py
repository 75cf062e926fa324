import pytest

from rayrlhf.data.demo_task import GOOD_WORDS, demo_prompts, positive_word_fraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("good day", 0.5),
        ("", 0.0),
        ("...!!! ,,", 0.0),  # no words at all
        ("good, great!", 1.0),  # punctuation is not a word
        ("Good GREAT Happy", 1.0),  # case-insensitive
        ("the cat is nice.", 0.25),
        ("bad sad mad", 0.0),
        ("goodness", 0.0),  # whole words only
        ("kind-hearted", 0.5),  # the hyphen splits: 'kind' + 'hearted'
    ],
)
def test_positive_word_fraction_hand_cases(text, expected):
    assert positive_word_fraction(["any prompt"], [text]) == [pytest.approx(expected)]


def test_prompt_is_ignored_and_rows_are_independent():
    scores = positive_word_fraction(["good good", "x"], ["a b c good", "warm calm"])
    assert scores == [pytest.approx(0.25), pytest.approx(1.0)]


def test_every_good_word_scores_one():
    for word in GOOD_WORDS:
        assert positive_word_fraction([""], [word]) == [1.0], word


def test_demo_prompts_reproducible():
    assert demo_prompts(20, seed=4) == demo_prompts(20, seed=4)
    assert demo_prompts(20, seed=4) != demo_prompts(20, seed=5)
    assert len(demo_prompts(7)) == 7
