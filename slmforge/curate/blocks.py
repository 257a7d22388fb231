"""slmforge's own datatrove blocks: PII redaction, domain relevance, broken-text check, held-out split tagging.

Each is a plain datatrove PipelineStep, so it runs under any datatrove executor (local, Ray, Slurm) like the
library's own filters. Module-level functions only: executors pickle the pipeline.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.gopher_quality_filter import GopherQualityFilter
from datatrove.pipeline.formatters.pii import PIIFormatter, PIIReplacer

from slmforge.run import sha256_bytes

# Example domains are documentation, not people (RFC 2606); redacting them would damage manuals.
_EXAMPLE_DOMAINS = re.compile(r"@(?:[\w-]+\.)*(?:example\.(?:com|org|net)|[\w-]+\.(?:example|test|invalid|localhost))$", re.I)
_PHONE = (
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?\(?\d{1,4}\)?(?:[\s.-]\d{2,4}){2,4}"  # +44 20 7946 0958, +1 (555) 123-4567
    r"|\(\d{3}\)\s?\d{3}[\s.-]\d{4}"  # (555) 123-4567
    r"|\b\d{3}[.-]\d{3}[.-]\d{4})(?![\w.-]?\d)"  # 555-123-4567
)
_SECRETS = (
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]+?-----END [A-Z ]*PRIVATE KEY-----"
    r"|\bAKIA[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b"  # GitHub tokens
    r"|\bsk-[A-Za-z0-9_-]{20,}"  # OpenAI-style API keys
    r"|\bxox[baprs]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|\beyJ[\w-]{10,}\.[\w-]{10,}\.[\w-]{10,}"  # JWTs
)
# key = value / key: value assignments of long opaque values; only the value is replaced
_ASSIGNED_SECRET = re.compile(
    r"(?i)(\b(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|token|password|passwd)\b[\"']?\s*[:=]\s*[\"']?)"
    r"([A-Za-z0-9/+_\-.]{16,})"
)


# "see Section 4.1.2.3" is a manual's cross-reference, not an address
_NUMBERING_BEFORE = re.compile(r"(?i)(?:section|chapter|table|figure|example|appendix|version|release|step|§)\s*$")


def _redact_ips(regex: re.Pattern, text: str, public_only: bool) -> tuple[str, int]:
    count = 0

    def replace(m: re.Match) -> str:
        nonlocal count
        value, before, after = m.group(0), text[max(0, m.start() - 24): m.start()], text[m.end(): m.end() + 2]
        line_start = before.rsplit("\n", 1)[-1].strip("# \t") == "" and (len(before) < 24 or "\n" in before or m.start() == 0)
        numbered_heading = line_start and after.startswith(". ")  # "### 8.5.1.1. Time Stamps"
        if not _is_ip(value, public_only) or _NUMBERING_BEFORE.search(before) or re.match(r"\.\d", after) or numbered_heading:
            return value
        count += 1
        return "<IP_ADDRESS>"

    return regex.sub(replace, text), count


def _not_example_email(value: str) -> bool:
    return not _EXAMPLE_DOMAINS.search(value)


def _is_ip(value: str, public_only: bool) -> bool:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return False
    return ip.is_global or not public_only


class RedactPII(PipelineStep):
    """Replace emails, phone numbers, IP addresses and keys/tokens with typed placeholders.

    Reuses datatrove's PIIReplacer (and its email/IP patterns); adds phones and secrets, skips documentation
    example domains, and counts what it replaced per kind in doc.metadata["pii"] for the report.
    """

    name = "🔒 PII redaction"
    type = "✂️ - FORMAT"

    def __init__(self, emails=True, phones=True, ips=True, only_public_ips=True, secrets=True):
        super().__init__()
        reference = PIIFormatter()  # only for its tested regexes
        self.replacers: list[tuple[str, PIIReplacer]] = []
        if secrets:
            self.replacers.append(("secret", PIIReplacer(_SECRETS, "<SECRET>")))
        if emails:
            self.replacers.append(("email", PIIReplacer(
                reference.emails_replacer.regex.pattern, "<EMAIL>", validator=_not_example_email)))
        self.ip_regex = re.compile(reference.ip_replacer.regex.pattern) if ips else None
        self.only_public_ips = only_public_ips
        if phones:
            self.replacers.append(("phone", PIIReplacer(_PHONE, "<PHONE>")))
        self.assigned_secrets = secrets

    def redact(self, text: str) -> tuple[str, Counter]:
        found: Counter = Counter()
        for kind, replacer in self.replacers:
            placeholder = replacer.replacements[0]
            new = replacer.replace(text)
            if new != text:
                found[kind] += new.count(placeholder) - text.count(placeholder)
            text = new
        if self.ip_regex is not None:
            text, n = _redact_ips(self.ip_regex, text, self.only_public_ips)
            found["ip"] += n
        if self.assigned_secrets:
            text, n = _ASSIGNED_SECRET.subn(lambda m: m.group(1) + "<SECRET>", text)
            found["secret"] += n
        return text, +found

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.stat_update("total")
            doc.text, found = self.redact(doc.text)
            if found:
                doc.metadata["pii"] = dict(found)
                for kind, n in found.items():
                    self.stat_update(f"redacted_{kind}", value=n)
            yield doc


class DomainRelevanceFilter(BaseFilter):
    """Drop chunks far from the domain: TF-IDF cosine to a reference (topic texts, or the corpus centroid).

    The threshold is relative to the corpus median, so one setting works across corpora of different vocabularies.
    Fitted once on the driver (needs the whole corpus) and shipped to workers inside the pipeline.
    """

    name = "🎯 domain relevance"

    def __init__(self, corpus: list[str], reference: list[str], min_relative_score: float, exclusion_writer=None):
        super().__init__(exclusion_writer)
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english", max_features=50_000, min_df=1)
        matrix = self.vectorizer.fit_transform(corpus + list(reference))
        rows = matrix[len(corpus):] if reference else matrix[: len(corpus)]
        centroid = np.asarray(rows.mean(axis=0)).ravel()
        self.reference = centroid / (np.linalg.norm(centroid) or 1.0)
        scores = self.scores(corpus)
        self.median = float(np.median(scores)) if len(scores) else 0.0
        self.threshold = self.median * min_relative_score

    def scores(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.vectorizer.transform(texts) @ self.reference).ravel()

    def filter(self, doc: Document):
        score = float(self.scores([doc.text])[0])
        doc.metadata["relevance"] = round(score, 4)
        return True if score >= self.threshold else (False, "off_topic")


def control_char_ratio(text: str) -> float:
    """Share of characters that are control characters (tab and newlines aside) or U+FFFD: binary bytes read as text."""
    if not text:
        return 0.0
    bad = sum(1 for ch in text if ch == "\ufffd" or (not ch.isprintable() and ch not in "\n\t\r\x0c\x0b"))
    return bad / len(text)


_ENCODED_RUN = re.compile(r"[A-Za-z0-9+/=]{40,}")  # base64 / hex: 40+ characters without a space or punctuation


def encoded_char_ratio(text: str) -> float:
    """Share of characters inside base64- or hex-like runs (an embedded image, key or dump)."""
    return sum(len(m) for m in _ENCODED_RUN.findall(text)) / len(text) if text else 0.0


class QualityFilter(GopherQualityFilter):
    """datatrove's GopherQualityFilter plus the two checks Gopher lacks: binary bytes decoded as text (control and
    replacement characters, which Gopher's word statistics let through: \xff and \xe0 decode to letters) and
    encoded blobs (base64 splits into "words" at + and /, so its average word length can look like code's)."""

    def __init__(self, max_control_char_ratio: float | None = None, max_encoded_char_ratio: float | None = None, **gopher):
        super().__init__(**gopher)
        self.max_control_char_ratio = max_control_char_ratio
        self.max_encoded_char_ratio = max_encoded_char_ratio

    def filter(self, doc: Document):
        if self.max_control_char_ratio is not None and control_char_ratio(doc.text) > self.max_control_char_ratio:
            return False, "broken_control_chars"
        if self.max_encoded_char_ratio is not None and encoded_char_ratio(doc.text) > self.max_encoded_char_ratio:
            return False, "broken_encoded_blob"
        return super().filter(doc)


def heldout_documents(doc_ids: list[str], fraction: float, seed: int) -> set[str]:
    """Document-level held-out split by hash: a document's side never changes when others are added or removed."""
    if fraction <= 0 or not doc_ids:
        return set()
    unit = {d: int(sha256_bytes(f"{seed}:{d}".encode())[:15], 16) / 16**15 for d in set(doc_ids)}
    chosen = {d for d, u in unit.items() if u < fraction}
    if not chosen and len(unit) > 1:  # tiny corpora: still hold one document out
        chosen = {min(unit, key=unit.get)}
    return chosen


class TagSplit(PipelineStep):
    """Write metadata["split"] = heldout | train, so one writer can route documents by `${split}`."""

    name = "🔀 held-out split"
    type = "✂️ - FORMAT"

    def __init__(self, heldout_doc_ids: set[str]):
        super().__init__()
        self.heldout = set(heldout_doc_ids)

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            split = "heldout" if doc.metadata.get("doc_id") in self.heldout else "train"
            doc.metadata["split"] = split
            self.stat_update(split)
            yield doc


def normalized_text(doc: Document) -> str:
    """Exact-dedup key: case and whitespace differences do not make a copy new."""
    return re.sub(r"\s+", " ", doc.text).strip().lower()
