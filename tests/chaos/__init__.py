"""Chaos tests: a campaign survives killed workers, restarted Redis and PostgreSQL, two
beats, a misbehaving provider and a pause, with nothing lost and nothing sent twice
beyond what the engine promises.

Everything runs as real processes against private services started here (a
`redis-server` and a PostgreSQL cluster made with initdb, on free ports), so killing or
restarting them never touches the shared services other tests use.
"""
