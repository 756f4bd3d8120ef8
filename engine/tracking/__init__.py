"""What happens to a message after the provider accepted it.

Providers (Twilio, WhatsApp Cloud, the email relay, the app for push) report events;
this package turns each into facts about one delivery, exactly once, and into
suppressions when an address cannot or must not be sent to again.

The rules every entry point keeps:

- **Facts, not states.** An event sets deliveries.<fact>_at (delivered, opened,
  clicked, failed) by compare-and-set, only while it is NULL, and bumps the matching
  campaign_channels.<fact>_count in the same statement (engine.tracking.recording).
  Nothing ever clears a fact, and events never touch `status`, `sent_at` or
  `sent_count`: those belong to the dispatch engine, whose own compare-and-set would
  otherwise count a row twice. So order does not matter: a `delivered` that arrives
  while the sender has not yet recorded the row as sent (still 'sending', or 'queued'
  for a retry) is recorded all the same, and the sender's later write leaves it alone;
  a late provider 'queued'/'sent' callback is stored as a `sent` event and moves
  nothing.
- **Implications.** A human open implies delivery; a human click implies an open and
  delivery. A machine open or click (privacy proxy, link scanner) proves delivery only.
- **Exactly once.** The event's idempotency key (source, provider_event_id) makes a
  re-posted event a no-op, and the compare-and-set makes any number of distinct events
  move a counter once per delivery.
- **Unknown deliveries are not errors.** A webhook about a message Herald does not know
  answers 2xx (providers retry errors for days); a Twilio or WhatsApp status whose
  message id is not recorded yet is kept as an orphan and adopted later
  (engine.tracking.orphans).
- **Services take a Session and never commit**, like the rest of the engine.
"""
