"""Click tracking: a channel's links, marked in its templates once, filled per message.

**Where a click goes.** Only to the campaign's own links, never to a URL taken from the
request (no open redirect):

- A *static* link (the URL is written out in the template, or is the push `url`) is a
  row of campaign_links, written once per channel when it is first compiled for sending
  (`ensure_links`). Its click token is `<delivery id>.<link id>.<tag>`; the destination
  is read from the row at click time.
- A *dynamic* link (the template builds the URL with `{{ … }}`:
  `https://shop.example/?ref={{ contact.id }}`, or an href with `{% if %}` inside) has a
  row too (its template text, for stats), but each contact's destination differs, so it
  is signed into the token: `<delivery id>.<link id>.<base64url destination>.<tag>`.
  The HMAC covers all of it: the destination is one Herald rendered for that message.
- Untracked: a URL that comes wholly from a variable (`href="{{ contact.attributes.url
  }}"`: not one of the campaign's links as written), URLs longer than 2,000 bytes,
  Herald's own URLs (unsubscribe `/u/`, tracking `/t/`), mailto:, tel: and anything
  else that is not http or https, and URLs inside template tags
  (`{% if x == "https://…" %}`).

**What is tracked**: email `html` (the href of each <a> and <area>, never an image's
src, which would count every image load as a click; URLs in the page's text are left
as the reader sees them) plus a 1x1 open pixel before the last `</body>` (appended when
there is none); email `text`, SMS `body` and WhatsApp `body` (every http(s) URL; trailing
sentence punctuation is not part of it); push `url`. The subject, push title and body,
and WhatsApp template parameters are left alone (an approved template's URL button only
takes the suffix it was approved with).

**How, cheaply.** Finding links in every rendered message (a regex over a 5 KB email
with a Python callback per link) costs ~100 µs, the engine's whole per-message budget.
So links are found once per channel, in the template *sources*: `Tracking` replaces
each with a marker (`L<id>` between two delimiters; a dynamic link is wrapped in
`D<id>` … `E`; the pixel is `O`) and hands back that marked config, which the sender
compiles instead of the stored one. Template literal text is rendered verbatim, so the
markers come out of every render intact, and `Tracking.fill` swaps them for tracked
URLs with one split and one join: one HMAC per distinct link, no regex. The delimiter
is ESC and a nonce derived from SECRET_KEY: contact data cannot forge a marker (which
could otherwise get a destination of its choosing signed).

**UTM.** A channel's optional `utm` object (`source`, `medium`, `campaign`) becomes
utm_source / utm_medium / utm_campaign on each destination, after its existing query and
before its fragment. A parameter the link already has wins (a marketer who wrote
utm_medium=banner on one link meant it); the missing ones are still added.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hmac
import html as html_lib
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote_plus

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.db import insert_ignoring_conflicts
from engine.models.links import URL_MAX_BYTES, CampaignLink
from engine.settings import Settings
from engine.tracking.opens import OPEN_PATH, OPEN_SALT, pixel_tag, signer

CLICK_SALT = "herald.track.click"
CLICK_PATH = "/t/c/"
UTM_KEYS = ("source", "medium", "campaign")
UTM_VALUE_MAX = 200
# Longest token read back: a dynamic link's destination (URL_MAX_BYTES) in base64.
TOKEN_MAX = 3000

# A URL in template text: quotes, angle brackets, whitespace, a backtick (Markdown code)
# and a {% … %} or {# … #} tag end it; a {{ … }} expression is part of it (dynamic).
_SOURCE_URL = re.compile(r"https?://(?:[^\s<>\"'`{}]|\{\{.*?\}\})+", re.S)
# The href of an <a> or <area> (quoted either way, or bare); the value is group 2, 3 or 4.
_HREF = re.compile(
    r"""(<(?:a|area)\s[^>]*?\bhref\s*=\s*)(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""",
    re.IGNORECASE,
)
_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)
_SCHEME = re.compile(r"https?://", re.IGNORECASE)
# Characters that end a sentence rather than a URL ("see https://x.example.").
_TRAILING = ".,;:!?)]*"
_BODY_CLOSE = re.compile(r"</body\s*>", re.IGNORECASE)
# Control characters and spaces have no place in a destination (a Location header).
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")
_STATIC_TOKEN = re.compile(r"([1-9][0-9]{0,18})\.([1-9][0-9]{0,18})\.([A-Za-z0-9_-]{22})")
_DYNAMIC_TOKEN = re.compile(
    r"([1-9][0-9]{0,18})\.([1-9][0-9]{0,18})\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]{22})"
)

# Markers (see the module docstring): ESC and a secret nonce, then the marker's name
# (L<id>, D<id>, E, O), then the same again. The nonce comes from SECRET_KEY and never
# appears in a message, so contact data cannot forge a marker: a first name holding
# "<ESC>D2<ESC>https://evil.example<ESC>E<ESC>" stays text and is never signed.
MARKER_SALT = "herald.track.marker"
ESC = "\x1b"


def marker_delimiter(settings: Settings) -> str:
    return ESC + signer(settings.secret_key, MARKER_SALT).tag("marker")[:12]


# -- finding links in a channel's templates (compile time) -------------------------------


@dataclass(frozen=True)
class FoundLink:
    """One link in a template: where it stands in its field's source, `text` as written
    there (HTML entities and template tags included), `url` as campaign_links stores it
    (entities decoded)."""

    field: str
    start: int
    end: int
    text: str
    url: str
    dynamic: bool
    html: bool


def _trim(url: str) -> str:
    while url and url[-1] in _TRAILING:
        last = url[-1]
        if last == ")" and url.count("(") >= url.count(")"):
            break
        if last == "]" and url.count("[") >= url.count("]"):
            break
        url = url[:-1]
    return url


class _Tags:
    """The spans of a source's template tags, to tell literal text from tag insides."""

    def __init__(self, source: str) -> None:
        spans = [m.span() for m in _TAG.finditer(source)] if "{" in source else []
        self._starts = [start for start, _ in spans]
        self._ends = [end for _, end in spans]

    def inside(self, position: int) -> bool:
        index = bisect.bisect_right(self._starts, position) - 1
        return index >= 0 and position < self._ends[index]


def _link(
    field: str, start: int, text: str, own: tuple[str, ...], *, html: bool
) -> FoundLink | None:
    dynamic = _TAG.search(text) is not None
    url = html_lib.unescape(text) if html else text
    if (
        not _SCHEME.match(url)
        or len(url.encode()) > URL_MAX_BYTES
        or url.startswith(own)
        or (not dynamic and _UNSAFE.search(url))
    ):
        return None
    return FoundLink(field, start, start + len(text), text, url, dynamic, html)


def _fields(channel_type: str, config: Mapping[str, Any]) -> Iterator[tuple[str, str, bool]]:
    """(key, source, html) of each field whose links are tracked."""
    keys: tuple[tuple[str, bool], ...] = ()
    if channel_type == "email":
        keys = (("html", True), ("text", False))
    elif channel_type in ("sms", "whatsapp"):
        keys = (("body", False),)
    for key, html in keys:
        source = config.get(key)
        if isinstance(source, str):
            yield key, source, html


def find_links(
    channel_type: str, config: Mapping[str, Any], public_base_url: str
) -> list[FoundLink]:
    """Every trackable link in a channel's config, field by field, in order, repeats
    included. `public_base_url` says which URLs are Herald's own (never tracked)."""
    own = (f"{public_base_url}/u/", f"{public_base_url}/t/")
    found: list[FoundLink | None] = []
    for key, source, html in _fields(channel_type, config):
        if not _SCHEME.search(source):
            continue
        tags = _Tags(source)
        if html:
            for match in _HREF.finditer(source):
                group = (
                    2 if match.group(2) is not None else (3 if match.group(3) is not None else 4)
                )
                start, end = match.span(group)
                value = source[start:end]
                stripped = value.strip()
                start += len(value) - len(value.lstrip())
                if not tags.inside(match.start()):
                    found.append(_link(key, start, stripped, own, html=True))
        else:
            for match in _SOURCE_URL.finditer(source):
                if not tags.inside(match.start()):
                    found.append(_link(key, match.start(), _trim(match.group(0)), own, html=False))
    if channel_type == "push":
        url = config.get("url")
        if isinstance(url, str):
            found.append(_link("url", 0, url, own, html=False))
    return [link for link in found if link is not None]


def links_of(
    channel_type: str, config: Mapping[str, Any], public_base_url: str
) -> list[tuple[str, bool]]:
    """The channel's distinct links as campaign_links stores them: (url, dynamic)."""
    seen: dict[str, bool] = {}
    for link in find_links(channel_type, config, public_base_url):
        seen.setdefault(link.url, link.dynamic)
    return list(seen.items())


# -- UTM ---------------------------------------------------------------------------------


def utm_problems(raw: Any, prefix: str = "config.utm") -> dict[str, list[str]]:
    """What is wrong with a channel config's `utm` object ({} when it may be stored):
    an object of `source`, `medium`, `campaign`, each a non-blank string up to 200
    characters; null or absent means no UTM parameters."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        return {prefix: ["must be an object with source, medium and/or campaign"]}
    problems: dict[str, list[str]] = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}"
        if key not in UTM_KEYS:
            problems[path] = ["unknown key (allowed: source, medium, campaign)"]
        elif value is None:
            continue
        elif not isinstance(value, str) or not value.strip():
            problems[path] = ["must be a non-blank string"]
        elif len(value) > UTM_VALUE_MAX:
            problems[path] = [f"at most {UTM_VALUE_MAX} characters"]
    return problems


def utm_parameters(config: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """(("utm_source", "newsletter"), …) from a valid config, in a fixed order."""
    utm = config.get("utm")
    if not isinstance(utm, Mapping):
        return ()
    return tuple(
        (f"utm_{key}", utm[key].strip())
        for key in UTM_KEYS
        if isinstance(utm.get(key), str) and utm[key].strip()
    )


def with_utm(url: str, parameters: tuple[tuple[str, str], ...]) -> str:
    """`url` with the UTM parameters it does not have yet, after its own query and
    before its fragment. Its existing query is kept byte for byte."""
    return _append_utm(url, _encoded(parameters))


def _encoded(parameters: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    # Each (name, "name=value" percent-encoded): encoded once per channel, not per link.
    return tuple((key, f"{key}={quote(value, safe='')}") for key, value in parameters)


def _append_utm(url: str, encoded: tuple[tuple[str, str], ...]) -> str:
    if not encoded:
        return url
    base, hash_mark, fragment = url.partition("#")
    path, _, query = base.partition("?")
    if "utm_" in query:
        present = {unquote_plus(part.split("=", 1)[0]) for part in query.split("&") if part}
        added = "&".join(pair for key, pair in encoded if key not in present)
        if not added:
            return url
    else:
        added = "&".join(pair for _key, pair in encoded)
    joined = f"{query}&{added}" if query and not query.endswith("&") else f"{query}{added}"
    return f"{path}?{joined}{hash_mark}{fragment}"


# -- campaign_links (compile time) --------------------------------------------------------


@dataclass(frozen=True)
class Link:
    id: int
    url: str
    destination: str | None
    dynamic: bool


def ensure_links(
    session: Session,
    settings: Settings,
    channel_id: uuid.UUID,
    channel_type: str,
    config: Mapping[str, Any],
) -> list[Link]:
    """The channel's campaign_links rows, adding those its config has and the table
    lacks. Called once per channel and batch, not per message: a read once the first
    batch has written them. Concurrent first batches both insert; the unique key and
    ON CONFLICT DO NOTHING leave one row per link, and both read the same ids back."""
    wanted = links_of(channel_type, config, settings.public_base_url)
    rows = _links(session, channel_id)
    known = {row.url for row in rows}
    missing = [(url, dynamic) for url, dynamic in wanted if url not in known]
    if not missing:
        return rows
    utm = utm_parameters(config)
    insert_ignoring_conflicts(
        session,
        CampaignLink.__table__,
        [
            {
                "campaign_channel_id": channel_id,
                "url": url,
                "destination": None if dynamic else with_utm(url, utm),
                "dynamic": dynamic,
            }
            for url, dynamic in missing
        ],
        index_elements=["campaign_channel_id", "url"],
    )
    return _links(session, channel_id)


def _links(session: Session, channel_id: uuid.UUID) -> list[Link]:
    rows = session.execute(
        select(CampaignLink.id, CampaignLink.url, CampaignLink.destination, CampaignLink.dynamic)
        .where(CampaignLink.campaign_channel_id == channel_id)
        .order_by(CampaignLink.id)
    ).all()
    return [Link(row.id, row.url, row.destination, row.dynamic) for row in rows]


# -- tokens ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClickToken:
    delivery_id: int
    link_id: int
    destination: str | None  # dynamic links only


def _encode(destination: str) -> str:
    return base64.urlsafe_b64encode(destination.encode()).rstrip(b"=").decode()


def click_token(
    settings: Settings, delivery_id: int, link_id: int, destination: str | None = None
) -> str:
    signed = f"{delivery_id}.{link_id}"
    if destination is not None:
        signed = f"{signed}.{_encode(destination)}"
    return f"{signed}.{signer(settings.secret_key, CLICK_SALT).tag(signed)}"


def read_click_token(settings: Settings, token: object) -> ClickToken | None:
    """What a click token names, or None if it is forged, mangled or not a link."""
    if not isinstance(token, str) or len(token) > TOKEN_MAX:
        return None
    match = _STATIC_TOKEN.fullmatch(token) or _DYNAMIC_TOKEN.fullmatch(token)
    if match is None:
        return None
    delivery_id, link_id = int(match.group(1)), int(match.group(2))
    if delivery_id >= 2**63 or link_id >= 2**63:
        return None
    signed, _, tag = token.rpartition(".")
    # Compared as text: base64 leaves spare bits in the last character.
    if not hmac.compare_digest(signer(settings.secret_key, CLICK_SALT).tag(signed), tag):
        return None
    destination = None
    if match.re is _DYNAMIC_TOKEN:
        encoded = match.group(3)
        try:
            destination = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        # Herald signed it, so it is one of ours; checked again all the same.
        if not _SCHEME.match(destination) or _UNSAFE.search(destination):
            return None
    return ClickToken(delivery_id, link_id, destination)


# -- marking templates (compile time) and filling messages (per message) -----------------


class Tracking:
    """One channel's tracking, built once per batch from its config and its
    campaign_links rows (ensure_links). Pure: no database, no clock.

    `config` is the channel's config with every tracked link replaced by a marker (and
    the pixel's marker in the email html): compile *that* (CompiledChannel.compile), and
    pass each rendered message through `fill`.
    """

    def __init__(
        self,
        settings: Settings,
        channel_type: str,
        config: Mapping[str, Any],
        links: Iterable[Link],
    ) -> None:
        base = settings.public_base_url
        self.channel_type = channel_type
        self._click_prefix = f"{base}{CLICK_PATH}"
        self._open_prefix = f"{base}{OPEN_PATH}"
        self._click = signer(settings.secret_key, CLICK_SALT)
        self._open = signer(settings.secret_key, OPEN_SALT)
        self._utm = _encoded(utm_parameters(config))
        mark = self._mark = marker_delimiter(settings)
        ids = {(link.url, link.dynamic): link.id for link in links}
        marked: dict[str, Any] = dict(config)
        marked.pop("utm", None)  # configures tracking; not part of any message
        # Marker names (what stands between two ESCs) → link id.
        self._static: dict[str, int] = {}
        self._dynamic: dict[str, int] = {}
        # The fields to fill: (key, html, carries the pixel).
        fields: list[tuple[str, bool, bool]] = []
        by_field: dict[str, list[FoundLink]] = {}
        for found in find_links(channel_type, config, base):
            if (found.url, found.dynamic) in ids:  # else not written yet: untracked
                by_field.setdefault(found.field, []).append(found)
        for key, source, html in _fields(channel_type, config):
            found = by_field.get(key, [])
            pixel = channel_type == "email" and html
            if not found and not pixel:
                continue
            parts: list[str] = []
            position = 0
            for link in found:
                link_id = ids[(link.url, link.dynamic)]
                parts.append(source[position : link.start])
                if link.dynamic:
                    self._dynamic[f"D{link_id}"] = link_id
                    parts.append(f"{mark}D{link_id}{mark}{link.text}{mark}E{mark}")
                else:
                    self._static[f"L{link_id}"] = link_id
                    parts.append(f"{mark}L{link_id}{mark}")
                position = link.end
            parts.append(source[position:])
            text = "".join(parts)
            marked[key] = _with_pixel_marker(text, f"{mark}O{mark}") if pixel else text
            fields.append((key, html, pixel))
        if channel_type == "push" and "url" in by_field:
            link_id = ids[(by_field["url"][0].url, False)]
            self._static[f"L{link_id}"] = link_id
            marked["url"] = f"{mark}L{link_id}{mark}"
            fields.append(("url", False, False))
        self.config = marked
        self._fields = tuple(fields)

    @property
    def tracks(self) -> bool:
        """Whether anything is tracked (else fill is a no-op and may be skipped)."""
        return bool(self._fields)

    def fill(self, content: Mapping[str, Any], delivery_id: int) -> dict[str, Any]:
        """The rendered message (rendered from `config`) with its markers replaced by
        this delivery's tracked URLs and open pixel. The input is not modified."""
        out = dict(content)
        out.pop("utm", None)
        urls: dict[str, str] = {}  # one HMAC per link per message, whatever the fields
        for key, html, pixel in self._fields:
            value = out.get(key)
            if isinstance(value, str) and self._mark in value:
                out[key] = self._fill(value, delivery_id, urls, html=html, pixel=pixel)
        return out

    def _fill(
        self, value: str, delivery_id: int, urls: dict[str, str], *, html: bool, pixel: bool
    ) -> str:
        # One split and one join: scanning a 5 KB email costs microseconds per pass, so
        # a pass per link (str.replace) or a regex callback per link would cost more
        # than the HMACs. Odd parts are marker names: markers always pair up, since a
        # link's markers stand in one literal stretch of its template.
        parts = value.split(self._mark)
        count = len(parts)
        if count % 2 == 0:  # unreachable by construction; never leave a half marker
            return value.replace(self._mark, "")
        index = 1
        while index < count:
            name = parts[index]
            if name in self._static:
                url = urls.get(name)
                if url is None:
                    url = urls[name] = self._click_url(f"{delivery_id}.{self._static[name]}")
                parts[index] = url
            elif name in self._dynamic and index + 2 < count and parts[index + 2] == "E":
                parts[index] = self._dynamic_url(
                    self._dynamic[name], parts[index + 1], delivery_id, html=html
                )
                parts[index + 1] = parts[index + 2] = ""
                index += 2
            elif name == "O" and pixel:
                parts[index] = self._pixel(delivery_id)
            else:
                parts[index] = ""
            index += 2
        return "".join(parts)

    def _click_url(self, signed: str) -> str:
        return f"{self._click_prefix}{signed}.{self._click.tag(signed)}"

    def _pixel(self, delivery_id: int) -> str:
        token = f"{delivery_id}.{self._open.tag(str(delivery_id))}"
        return pixel_tag(f"{self._open_prefix}{token}")

    def _dynamic_url(self, link_id: int, rendered: str, delivery_id: int, *, html: bool) -> str:
        destination = html_lib.unescape(rendered) if html else rendered
        if (
            not _SCHEME.match(destination)
            or len(destination.encode()) > URL_MAX_BYTES
            or _UNSAFE.search(destination)
        ):
            return rendered  # left as rendered, untracked
        encoded = _encode(_append_utm(destination, self._utm))
        return self._click_url(f"{delivery_id}.{link_id}.{encoded}")


def _with_pixel_marker(html: str, marker: str) -> str:
    """The pixel's marker before the last </body> outside template tags, or at the end."""
    tags = _Tags(html)
    at = html.rfind("</body>")
    if at < 0 or tags.inside(at):
        closes = [m.start() for m in _BODY_CLOSE.finditer(html) if not tags.inside(m.start())]
        at = closes[-1] if closes else len(html)
    return f"{html[:at]}{marker}{html[at:]}"
