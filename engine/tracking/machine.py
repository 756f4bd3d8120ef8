"""Telling machines from people at the tracking endpoints.

A pixel fetch or a link click is recorded either way (delivery_events, machine = true
or false); only a person's moves the opened / clicked counters (engine.tracking.recording:
a machine open or click proves delivery and nothing more). Each rule has a name, kept in
the event's detail as `machine_rule`:

- `head` (opens, clicks): a HEAD request. Link checkers send them; browsers and mail
  clients GET.
- `no_user_agent` (opens, clicks): no User-Agent at all, which no browser or mail client
  omits.
- `apple_mpp` (opens, clicks): Apple Mail Privacy Protection's proxy, whose User-Agent is
  exactly "Mozilla/5.0".
- `apple_network` (opens only): a fetch from Apple's own networks (17.0.0.0/8,
  2403:300::/32, 2620:149::/32, 2a01:b740::/32), where the MPP proxy runs. Clicks are
  not judged by it: MPP prefetches images, never links.
- `bot_user_agent` (opens, clicks): HTTP libraries (curl, wget, python-requests, Go,
  Java, okhttp…), crawlers (bot, crawl, spider, slurp), link previews (preview,
  facebookexternalhit, WhatsApp, Telegram, Discord), Office's own check before it opens
  a link (ms-office, "Existence Discovery"; Outlook showing a message's images is a
  person and counts), headless browsers, and mail security gateways (BingPreview, i.e.
  Defender/SafeLinks, Barracuda, Mimecast, Proofpoint, Symantec, Forcepoint, Trend
  Micro, Sophos, FireEye, Zscaler, IronPort).
- `too_soon` (clicks): less than 10 s after the message was sent, or before the sender
  recorded it as sent. Security scanners follow links on arrival; people do not read
  that fast.
- `burst` (clicks): another link of the same message was clicked less than a second
  before. Scanners open every link at once.

Image proxies that fetch when a person opens the message count as that person:
Gmail's (GoogleImageProxy) and Yahoo's (YahooMailProxy). They cache the image, so
later opens by the same reader are not seen, which unique opens do not need anyway.
The proxy is noted in the detail (`proxy: google`).

The rules judge each hit on its own, so a person's open or click after a machine's on
the same delivery still counts, once. Two limits, by design: the first click of a
burst is judged before the others arrive (the 10-second rule catches most scanners
anyway), and a person behind a bare "Mozilla/5.0" client or on Apple's corporate
network is taken for a machine.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

SCANNER_WINDOW = timedelta(seconds=10)
BURST_WINDOW = timedelta(seconds=1)
APPLE_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in ("17.0.0.0/8", "2403:300::/32", "2620:149::/32", "2a01:b740::/32")
)
APPLE_MPP_USER_AGENT = "Mozilla/5.0"
_BOT_USER_AGENT = re.compile(
    r"(?<!cu)bot|crawl|spider|slurp|preview|scanner"
    r"|curl/|wget/|python-requests|python-urllib|python-httpx|aiohttp|httpie|go-http-client"
    r"|java/|okhttp|apache-httpclient|libwww-perl|node-fetch|axios/|guzzlehttp"
    r"|headlesschrome|phantomjs|facebookexternalhit|whatsapp/|telegram|discord"
    r"|existence discovery|ms-office|msoffice"
    r"|barracuda|mimecast|proofpoint|symantec|forcepoint|trend ?micro|sophos|fireeye|zscaler"
    r"|ironport",
    re.IGNORECASE,
)
_HUMAN_PROXIES = (("GoogleImageProxy", "google"), ("YahooMailProxy", "yahoo"))


@dataclass(frozen=True)
class Hit:
    """What the tracking endpoints know about a request."""

    method: str
    user_agent: str
    ip: str | None


@dataclass(frozen=True)
class Verdict:
    rule: str | None  # None: a person
    proxy: str | None = None

    @property
    def machine(self) -> bool:
        return self.rule is not None

    def detail(self) -> dict[str, str]:
        detail = {}
        if self.rule:
            detail["machine_rule"] = self.rule
        if self.proxy:
            detail["proxy"] = self.proxy
        return detail


def _common(hit: Hit) -> str | None:
    if hit.method == "HEAD":
        return "head"
    agent = hit.user_agent.strip()
    if not agent:
        return "no_user_agent"
    if agent == APPLE_MPP_USER_AGENT:
        return "apple_mpp"
    if _BOT_USER_AGENT.search(agent):
        return "bot_user_agent"
    return None


def _from_apple(ip: str | None) -> bool:
    if not ip:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in APPLE_NETWORKS)


def judge_open(hit: Hit) -> Verdict:
    rule = _common(hit)
    if rule is None and _from_apple(hit.ip):
        rule = "apple_network"
    proxy = next((name for token, name in _HUMAN_PROXIES if token in hit.user_agent), None)
    return Verdict(rule, proxy if rule is None else None)


def judge_click(
    hit: Hit, *, sent_at: datetime | None, now: datetime, other_link_just_clicked: bool
) -> Verdict:
    rule = _common(hit)
    if rule is None and (sent_at is None or now - sent_at < SCANNER_WINDOW):
        rule = "too_soon"
    if rule is None and other_link_just_clicked:
        rule = "burst"
    return Verdict(rule)
