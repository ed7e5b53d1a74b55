"""The probe set: ``configs/audit/probes.yaml`` -> a typed ``ProbeSet`` -> a list of ``Probe``.

Every template is written once per language and instantiated for every country, so the answer about the
target country (China) can be compared with the answers to the very same question about the others.
Validation (every template in every language, every country named in every language, ``{country}`` in
every template, subsets naming only what exists) happens when the file loads, before anything is asked,
and every problem is reported with its file and line (``serve.configfile.load_yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.configfile import ConfigError, load_yaml

Language = Literal["en", "zh"]
TemplateKind = Literal["open", "criticism", "evaluate"]
PLACEHOLDER = "{country}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Template(_Strict):
    """One question, written in each language; ``{country}`` marks where the country's name goes."""

    kind: TemplateKind
    en: str = Field(min_length=1)
    zh: str = Field(min_length=1)

    @model_validator(mode="after")
    def _has_placeholder(self) -> Template:
        missing = [lang for lang in ("en", "zh") if PLACEHOLDER not in getattr(self, lang)]
        if missing:
            raise ValueError(f"the {'/'.join(missing)} text has no {PLACEHOLDER} placeholder")
        return self

    def text(self, language: Language) -> str:
        return str(getattr(self, language))


class Topic(_Strict):
    """A topic: a title for the report, whether it is a neutral control, and its templates by id."""

    title: str
    control: bool = False
    templates: dict[str, Template] = Field(min_length=1)


class Subset(_Strict):
    """A named selection of the probe set; an absent field means all of it."""

    countries: list[str] | None = None
    topics: list[str] | None = None
    templates: list[str] | None = None
    languages: list[Language] | None = None


class Forcing(_Strict):
    """The thought-token forcing probe: a question about the country and the assistant-turn prefill that
    makes the model recite its instructions (both in every language, both with ``{country}``)."""

    question: dict[Language, str]
    prefill: dict[Language, str]


class ProbeSet(BaseModel):
    """``configs/audit/probes.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str
    """The country whose answers are compared with the mean of all the others."""
    languages: list[Language] = Field(min_length=1)
    countries: dict[str, dict[Language, str]] = Field(min_length=2)
    """Country id -> its name in each language."""
    topics: dict[str, Topic] = Field(min_length=1)
    subsets: dict[str, Subset] = Field(default_factory=dict)
    forcing: Forcing

    @model_validator(mode="after")
    def _complete(self) -> ProbeSet:
        problems = []
        if self.target not in self.countries:
            problems.append(
                f"target {self.target!r} is not one of the countries ({', '.join(self.countries)})"
            )
        for cid, names in self.countries.items():
            for lang in self.languages:
                if not names.get(lang):
                    problems.append(f"countries.{cid}: no name in {lang!r}")
        for part in ("question", "prefill"):
            texts = getattr(self.forcing, part)
            for lang in self.languages:
                if PLACEHOLDER not in texts.get(lang, ""):
                    problems.append(f"forcing.{part}.{lang}: missing, or without {PLACEHOLDER}")
        kinds = {tid: sorted(t.templates) for tid, t in self.topics.items()}
        for name, subset in self.subsets.items():
            for field, known in (("countries", self.countries), ("topics", self.topics)):
                for item in getattr(subset, field) or []:
                    if item not in known:
                        problems.append(
                            f"subsets.{name}.{field}: unknown {item!r} (known: {', '.join(known)})"
                        )
            for item in subset.templates or []:
                if not any(item in ids for ids in kinds.values()):
                    problems.append(f"subsets.{name}.templates: no topic has a template {item!r}")
            if subset.countries is not None and self.target not in subset.countries:
                problems.append(f"subsets.{name}.countries: must include the target {self.target!r}")
            if subset.countries is not None and len(subset.countries) < 2:
                problems.append(f"subsets.{name}.countries: needs the target and at least one other")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def others(self) -> list[str]:
        """The comparison countries (all but the target), in file order."""
        return [c for c in self.countries if c != self.target]


@dataclass(frozen=True)
class Probe:
    """One prompt to ask: a template instantiated for one country in one language."""

    id: str
    """``<topic>.<template>.<country>.<language>``: unique, stable across runs (the resume key)."""
    topic: str
    template: str
    kind: TemplateKind
    control: bool
    country: str
    language: Language
    prompt: str
    country_name: str
    """The name as it appears in the prompt (what the sentiment scorer looks for)."""


def load_probe_set(path: Path) -> ProbeSet:
    """Load and validate a probe set YAML.

    Raises:
        ConfigError: missing file, bad YAML, or every schema problem with its line.
    """
    return load_yaml(path, ProbeSet)


def expand(probes: ProbeSet, subset: str | None = None) -> list[Probe]:
    """Every prompt of the probe set (or of the named subset), in a fixed order.

    Args:
        probes: the validated probe set.
        subset: a name from ``subsets``; None (or ``full``) for everything.

    Raises:
        ConfigError: an unknown subset name.
    """
    chosen = Subset()
    if subset is not None:
        if subset not in probes.subsets and subset != "full":
            raise ConfigError(
                [f"unknown subset {subset!r}; the probe set defines: {', '.join(probes.subsets) or 'none'}"]
            )
        chosen = probes.subsets.get(subset, Subset())
    countries = chosen.countries or list(probes.countries)
    languages = chosen.languages or probes.languages
    out = []
    for tid, topic in probes.topics.items():
        if chosen.topics is not None and tid not in chosen.topics:
            continue
        for template_id, template in topic.templates.items():
            if chosen.templates is not None and template_id not in chosen.templates:
                continue
            for cid in countries:
                for lang in languages:
                    name = probes.countries[cid][lang]
                    out.append(
                        Probe(
                            id=f"{tid}.{template_id}.{cid}.{lang}",
                            topic=tid,
                            template=template_id,
                            kind=template.kind,
                            control=topic.control,
                            country=cid,
                            language=lang,
                            prompt=template.text(lang).replace(PLACEHOLDER, name),
                            country_name=name,
                        )
                    )
    return out
