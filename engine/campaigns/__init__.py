"""Campaign domain rules that need no database: config validation, per-channel config
validation, sandboxed message templates and the status machine's table.

The services that apply them to rows live in engine.services.campaigns (campaigns and
their status machine) and engine.campaigns.channels (a campaign's channels).
"""
