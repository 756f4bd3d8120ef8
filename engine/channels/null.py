"""The null provider: accepts everything at once and sends nothing.

It is the embedded default (nothing to configure to try Herald) and the benchmark's
provider, so it must cost next to nothing per message: no I/O, no per-message log line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from engine.channels.base import Channel, OutboundMessage, SendResult

log = logging.getLogger("herald.channels.null")


class NullChannel(Channel):
    name = "null"
    accepts_batch = True

    def __init__(self, channel_type: str) -> None:
        self.channel_type = channel_type  # one class serves all four channels

    def send(self, message: OutboundMessage) -> SendResult:
        return self.send_many([message])[0]

    def send_many(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("null %s provider accepted %d message(s)", self.channel_type, len(messages))
        return [SendResult(m.delivery_id, "sent", f"null-{m.delivery_id}") for m in messages]
