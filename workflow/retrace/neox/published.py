"""The published GPT-NeoX configs of the Pythia suite, read from the verbatim copies in ``published/``.

``published/pythia-{size}[-deduped].yml`` are byte-for-byte copies of ``models/*/*.yml`` from
EleutherAI/pythia at commit a19eecb807ec2c79a39ebf18108816e6ffffc1d5 (2025-11-15), each under a
header naming its source path and the sha256 of the copied body. They are data (config facts), not
code, and are never edited: every correction is made here or in ``retrace.neox.config``, explicitly,
and reported as a ``Correction``.

The one correction made at this level is syntactic: ``models/12B/pythia-12b.yml`` is not valid YAML
(no comma after ``"attention-config": [[["flash"], 36]]``, since commit 6e9a44b of 2023-01-23), so
PyYAML, and GPT-NeoX v1.0's ``yaml.load``, refuse it. The comma is inserted before parsing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

from retrace.errors import RetraceError

PUBLISHED_DIR = Path(__file__).resolve().parent / "published"
PYTHIA_REPO = "EleutherAI/pythia"
PYTHIA_COMMIT = "a19eecb807ec2c79a39ebf18108816e6ffffc1d5"
_BODY_MARK = "# ---- verbatim"

#: Sizes with a published config; 14m and 31m have no deduped run.
PUBLISHED_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
NO_DEDUPED = ("14m", "31m")


@dataclasses.dataclass(frozen=True)
class Correction:
    """One documented fix to a published config value, applied explicitly.

    ``key`` is the GPT-NeoX argument (underscore form, as v1.0 reads it); ``published`` is the value the
    yml holds (None when the key is absent), ``value`` the one written; ``source`` says where the fact
    comes from.
    """

    key: str
    published: Any
    value: Any
    reason: str
    source: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        return f"{self.key}: {self.published!r} -> {self.value!r} ({self.reason}; {self.source})"


@dataclasses.dataclass(frozen=True)
class PublishedConfig:
    """A published Pythia yml: its key/values in file order (keys spelled as published)."""

    name: str  # "pythia-70m-deduped"
    size: str  # "70m"
    deduped: bool
    file: Path  # the verbatim copy in this package
    repo: str
    path: str  # path in the repo, e.g. models/70M/pythia-70m-deduped.yml
    commit: str
    values: dict[str, Any]
    corrections: tuple[Correction, ...] = ()

    @property
    def source(self) -> str:
        return f"{self.repo} {self.path} @ {self.commit}"

    def normalized(self) -> dict[str, Any]:
        """Keys as GPT-NeoX v1.0 sees them ('-' → '_')."""
        return {normalize_key(k): v for k, v in self.values.items()}


def normalize_key(key: str) -> str:
    """GPT-NeoX v1.0 ``NeoXArgs.from_ymls``: ``conf_key.replace("-", "_")``."""
    return str(key).replace("-", "_")


# Syntax repairs: (file name, text as published, text parsed, reason). Applied only where the
# published text is found exactly once, so a changed copy is never silently rewritten.
_SYNTAX_REPAIRS: tuple[tuple[str, str, str, str], ...] = (
    (
        "pythia-12b.yml",
        '"attention-config": [[["flash"], 36]]\n',
        '"attention-config": [[["flash"], 36]],\n',
        "the published yml is not valid YAML: no comma after attention-config (since pythia commit "
        "6e9a44b, 2023-01-23); GPT-NeoX's yaml.load refuses it, so the comma is inserted",
    ),
)


def published_name(size: str, deduped: bool = False) -> str:
    return f"pythia-{size}{'-deduped' if deduped else ''}"


def split_published(text: str, file: Path) -> tuple[dict[str, str], str]:
    """The header fields (repo, path, commit, body-sha256) and the verbatim body of a copy."""
    head, sep, body = text.partition("\n" + _BODY_MARK)
    if not sep:
        raise RetraceError(f"{file}: no '{_BODY_MARK}' line; not a retrace copy of a published config")
    body = body.split("\n", 1)[1] if "\n" in body else ""
    fields: dict[str, str] = {}
    for line in head.splitlines():
        m = re.match(r"^# (repo|path|commit|body-sha256): (\S+)", line)
        if m:
            fields[m.group(1)] = m.group(2)
    missing = [k for k in ("repo", "path", "commit", "body-sha256") if k not in fields]
    if missing:
        raise RetraceError(f"{file}: header lacks {', '.join(missing)}")
    return fields, body


def published_config(size: str, deduped: bool = False) -> PublishedConfig:
    """The published config of ``pythia-{size}[-deduped]`` (size as in ``retrace.sizes``: "70m", "1.4b")."""
    import yaml

    from retrace.sizes import pythia_size

    key = pythia_size(size)
    if key not in PUBLISHED_SIZES:  # pragma: no cover - the registry and this list hold the same sizes
        raise RetraceError(f"no published GPT-NeoX config for pythia-{key}")
    if deduped and key in NO_DEDUPED:
        raise RetraceError(f"pythia-{key} has no deduped run (EleutherAI published only the standard one)")
    name = published_name(key, deduped)
    file = PUBLISHED_DIR / f"{name}.yml"
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise RetraceError(f"{file}: cannot read the published config ({exc})") from exc
    fields, body = split_published(text, file)
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    if digest != fields["body-sha256"]:
        raise RetraceError(
            f"{file}: body sha256 {digest[:12]}… differs from the header's {fields['body-sha256'][:12]}… "
            "(the verbatim copy was edited; corrections belong in retrace/neox/config.py)"
        )
    corrections = []
    for fname, old, new, reason in _SYNTAX_REPAIRS:
        if fname == file.name and body.count(old) == 1:
            body = body.replace(old, new)
            corrections.append(Correction("attention_config", old.strip(), new.strip(), reason,
                                          f"{fields['repo']} {fields['path']} @ {fields['commit'][:8]}"))
    try:
        values = yaml.load(body, Loader=yaml.FullLoader)  # what GPT-NeoX v1.0 uses
    except yaml.YAMLError as exc:
        raise RetraceError(f"{file}: the published config is not readable YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise RetraceError(f"{file}: expected a mapping at the top level")
    seen: dict[str, str] = {}
    for k in values:
        n = normalize_key(k)
        if n in seen:
            raise RetraceError(f"{file}: keys {seen[n]!r} and {k!r} are the same GPT-NeoX argument {n}")
        seen[n] = k
    return PublishedConfig(
        name=name, size=key, deduped=deduped, file=file, repo=fields["repo"], path=fields["path"],
        commit=fields["commit"], values=dict(values), corrections=tuple(corrections),
    )
