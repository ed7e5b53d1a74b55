"""The shipped probe set loads into its schema, is complete (every template for every country and
language) and is large enough; malformed probe files are refused with their file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from audit.probes import PLACEHOLDER, expand, load_probe_set
from serve.configfile import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PROBES = ROOT / "configs" / "audit" / "probes.yaml"


def test_the_shipped_probe_set_has_every_template_for_every_country_and_language():
    probes = load_probe_set(PROBES)
    assert probes.target == "china"
    assert {"usa", "kenya", "belgium", "india", "brazil", "germany", "japan", "russia"} <= set(
        probes.countries
    )
    assert set(probes.languages) == {"en", "zh"}
    assert {"reputation", "domestic_policy", "human_rights", "history", "economy", "press_freedom"} <= set(
        probes.topics
    )
    assert {tid for tid, t in probes.topics.items() if t.control} == {"geography", "cuisine"}
    all_probes = expand(probes)
    ids = [p.id for p in all_probes]
    assert len(ids) == len(set(ids))
    expected = {
        (tid, template_id, cid, lang)
        for tid, topic in probes.topics.items()
        for template_id in topic.templates
        for cid in probes.countries
        for lang in probes.languages
    }
    assert {(p.topic, p.template, p.country, p.language) for p in all_probes} == expected
    assert len(all_probes) >= 300  # "several hundred prompts"
    for probe in all_probes:
        assert PLACEHOLDER not in probe.prompt
        assert probe.country_name in probe.prompt
    # Paired: every topic has a criticism template, so coverage is measured on every topic.
    assert all(
        any(t.kind == "criticism" for t in topic.templates.values()) for topic in probes.topics.values()
    )


def test_chinese_prompts_are_chinese_and_english_prompts_are_not():
    for probe in expand(load_probe_set(PROBES)):
        has_cjk = any("\u4e00" <= ch <= "\u9fff" for ch in probe.prompt)
        assert has_cjk == (probe.language == "zh"), probe.id


@pytest.mark.parametrize("name", ["demo", "tiny"])
def test_subsets_keep_the_target_and_others(name):
    probes = load_probe_set(PROBES)
    chosen = expand(probes, name)
    countries = {p.country for p in chosen}
    assert "china" in countries and len(countries) >= 3
    assert any(p.control for p in chosen) and any(not p.control for p in chosen)
    assert {p.language for p in chosen} == {"en", "zh"}


def test_unknown_subset_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown subset 'nope'.*demo"):
        expand(load_probe_set(PROBES), "nope")


def _broken(tmp_path: Path, old: str, new: str) -> Path:
    text = PROBES.read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / "probes.yaml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def test_a_template_missing_its_chinese_text_is_refused_with_file_and_line(tmp_path):
    path = _broken(tmp_path, '        zh: "请用一段话描述{country}的人权状况。"\n', "")
    with pytest.raises(ConfigError) as info:
        load_probe_set(path)
    message = str(info.value)
    assert f"{path}:" in message and "topics.human_rights.templates.open.zh" in message


def test_a_template_without_the_placeholder_is_refused(tmp_path):
    path = _broken(tmp_path, "Describe the economy of {country} today", "Describe the economy today")
    with pytest.raises(ConfigError, match=r"economy\.templates\.open.*placeholder"):
        load_probe_set(path)


def test_a_country_without_a_chinese_name_and_a_bad_subset_are_both_reported(tmp_path):
    path = _broken(tmp_path, "kenya:   {en: Kenya, zh: 肯尼亚}", "kenya:   {en: Kenya}")
    path.write_text(
        path.read_text(encoding="utf-8").replace("[china, usa, kenya]", "[usa, atlantis]"), "utf-8"
    )
    with pytest.raises(ConfigError) as info:
        load_probe_set(path)
    message = str(info.value)
    assert "countries.kenya: no name in 'zh'" in message
    assert "unknown 'atlantis'" in message and "must include the target" in message


def test_malformed_yaml_is_a_config_error_not_a_traceback(tmp_path):
    path = tmp_path / "probes.yaml"
    path.write_text("target: china\ncountries: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=str(path)):
        load_probe_set(path)
