"""The licence attribution of a run's photos, declared per source in the config (``sources[].attribution``) and
written the same way wherever a run shows or redistributes them: contact sheets, the HTML report, the model card.

A source without ``attribution`` credits nothing (photos you own, or generated images); nothing is guessed from a
source's name or folder.
"""
from __future__ import annotations

import html

REDISTRIBUTION = "Any output that shows these photos or forgeries made from them must keep this attribution."


def source_attributions(cfg: dict) -> list[dict]:
    """``[{"source": name, "text": attribution}]`` for the config's sources that declare one, in config order."""
    return [{"source": str(s["name"]), "text": " ".join(str(s["attribution"]).split())}
            for s in cfg.get("sources") or [] if s.get("attribution")]


def changes_line(methods) -> str:
    """What a run does to the photos (the "indicate changes" of CC BY)."""
    made = ", ".join(sorted(str(m) for m in methods)) or "none"
    return f"Changes: altered into forgeries ({made}) by morphfuse or the named generator."


def attribution_text(cfg: dict, methods=()) -> str | None:
    """Plain text: one line per crediting source, the changes made and the redistribution note; None when no
    source declares an attribution.

    >>> t = attribution_text({"sources": [{"name": "a", "attribution": "X (2017), CC BY 4.0."}]}, ["sbi"])
    >>> t.split(" Changes: ")[0]
    'Photos of `a`: X (2017), CC BY 4.0.'
    """
    credits = source_attributions(cfg)
    if not credits:
        return None
    lines = [f"Photos of `{c['source']}`: {c['text']}" for c in credits]
    return " ".join(lines + [changes_line(methods), REDISTRIBUTION])


def attribution_html(cfg: dict, methods=()) -> str:
    """The same as one HTML paragraph (escaped; links left as text); an empty string when nothing is credited."""
    text = attribution_text(cfg, methods)
    return f"<p>{html.escape(text)}</p>" if text else ""
