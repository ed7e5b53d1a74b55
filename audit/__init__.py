"""Behaviour audit: measure a served model's topical slant (the target country vs the others, English and
Chinese) through any OpenAI-compatible endpoint, and whether a mitigation moves it.

A layer on top of ``serve`` (it may import serve; serve never imports it). Entry: ``python -m audit``
(``audit/cli.py``); README "Behaviour audit".
"""
