"""Configuration, read once from the environment.

Every knob Herald has is a field here and a row in the README's table, so an operator
never has to read code to learn what can be set. The API and the workers build
themselves from the same object.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Development defaults: good enough to try Herald on a laptop, refused in production.
DEV_SECRET_KEY = "dev-insecure-secret-key-change-me"
DEV_JWT_SECRET_KEY = "dev-insecure-jwt-secret-key-change-me"
# A valid Fernet key (32 zero bytes, urlsafe base64) so development can encrypt at all.
DEV_ENCRYPTION_KEY = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="

CHANNELS = ("email", "sms", "push", "whatsapp")
QUEUES = (*CHANNELS, "sync", "default")


class ConfigError(RuntimeError):
    """The environment describes a deployment Herald refuses to run."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def _env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


@dataclass(frozen=True)
class Settings:
    env: str = "development"
    var_dir: Path = Path("var")
    database_url: str = ""
    redis_url: str = ""
    secret_key: str = DEV_SECRET_KEY
    jwt_secret_key: str = DEV_JWT_SECRET_KEY
    jwt_access_token_expires: int = 900
    jwt_refresh_token_expires: int = 30 * 24 * 3600
    encryption_key: str = DEV_ENCRYPTION_KEY
    flower_basic_auth: str = ""
    public_base_url: str = "http://127.0.0.1:5000"
    # Seconds between beat's promotions of due campaigns.
    beat_tick: float = 1.0
    # Seconds between beat's reconciliation runs (lost batches, expired leases, retries).
    reconcile_interval: float = 5.0
    # How long a claimed batch's rows stay reserved to its worker (renewed every
    # checkpoint); a killed worker's rows are reclaimed this long after its last renewal.
    lease_seconds: float = 300.0
    # How long a queued row may wait for its enqueued batch task before it is presumed
    # lost with Redis (only checked while its channel's queue is empty).
    dispatch_grace: float = 60.0

    # Login throttling: failures allowed per window before 429.
    login_max_failures_per_account: int = 5
    login_max_failures_per_ip: int = 20
    login_failure_window: int = 900

    # Providers: one account per provider for the whole deployment.
    email_provider: str = "null"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_starttls: bool = False
    email_from: str = "Herald <no-reply@localhost>"
    email_allowed_from_domains: tuple[str, ...] = ()
    email_webhook_secret: str = ""
    sms_provider: str = "null"
    twilio_api_base: str = "https://api.twilio.com"
    twilio_account_sid: str = ""
    twilio_auth_token: str = ""
    twilio_from: str = ""
    push_provider: str = "null"
    fcm_api_base: str = "https://fcm.googleapis.com"
    fcm_credentials_file: str = ""
    whatsapp_provider: str = "null"
    whatsapp_api_base: str = "https://graph.facebook.com/v21.0"
    whatsapp_phone_number_id: str = ""
    whatsapp_access_token: str = ""
    whatsapp_app_secret: str = ""
    whatsapp_verify_token: str = ""
    # Soft bounces in a row (no delivery in between) after which an address is suppressed.
    soft_bounce_threshold: int = 3
    rate_per_second: dict[str, float] = field(
        default_factory=lambda: {channel: 0.0 for channel in CHANNELS}
    )

    @classmethod
    def from_env(cls) -> Settings:
        rates = {c: _env_float(f"{c.upper()}_RATE_PER_SECOND", 0.0) for c in CHANNELS}
        domains = tuple(
            d.strip().lower()
            for d in _env_str("EMAIL_ALLOWED_FROM_DOMAINS").split(",")
            if d.strip()
        )
        return cls(
            env=_env_str("HERALD_ENV", "development").lower(),
            var_dir=Path(_env_str("HERALD_VAR_DIR", "var")),
            database_url=_env_str("DATABASE_URL"),
            redis_url=_env_str("REDIS_URL"),
            secret_key=_env_str("SECRET_KEY", DEV_SECRET_KEY),
            jwt_secret_key=_env_str("JWT_SECRET_KEY", DEV_JWT_SECRET_KEY),
            jwt_access_token_expires=_env_int("JWT_ACCESS_TOKEN_EXPIRES", 900),
            jwt_refresh_token_expires=_env_int("JWT_REFRESH_TOKEN_EXPIRES", 30 * 24 * 3600),
            encryption_key=_env_str("ENCRYPTION_KEY", DEV_ENCRYPTION_KEY),
            flower_basic_auth=_env_str("FLOWER_BASIC_AUTH"),
            public_base_url=_env_str("PUBLIC_BASE_URL", "http://127.0.0.1:5000").rstrip("/"),
            beat_tick=_env_float("HERALD_BEAT_TICK", 1.0),
            reconcile_interval=_env_float("HERALD_RECONCILE_INTERVAL", 5.0),
            lease_seconds=_env_float("HERALD_LEASE_SECONDS", 300.0),
            dispatch_grace=_env_float("HERALD_DISPATCH_GRACE", 60.0),
            login_max_failures_per_account=_env_int("LOGIN_MAX_FAILURES_PER_ACCOUNT", 5),
            login_max_failures_per_ip=_env_int("LOGIN_MAX_FAILURES_PER_IP", 20),
            login_failure_window=_env_int("LOGIN_FAILURE_WINDOW", 900),
            email_provider=_env_str("EMAIL_PROVIDER", "null").lower(),
            smtp_host=_env_str("SMTP_HOST", "127.0.0.1"),
            smtp_port=_env_int("SMTP_PORT", 25),
            smtp_username=_env_str("SMTP_USERNAME"),
            smtp_password=_env_str("SMTP_PASSWORD"),
            smtp_starttls=_env_bool("SMTP_STARTTLS", False),
            email_from=_env_str("EMAIL_FROM", "Herald <no-reply@localhost>"),
            email_allowed_from_domains=domains,
            email_webhook_secret=_env_str("EMAIL_WEBHOOK_SECRET"),
            sms_provider=_env_str("SMS_PROVIDER", "null").lower(),
            twilio_api_base=_env_str("TWILIO_API_BASE", "https://api.twilio.com").rstrip("/"),
            twilio_account_sid=_env_str("TWILIO_ACCOUNT_SID"),
            twilio_auth_token=_env_str("TWILIO_AUTH_TOKEN"),
            twilio_from=_env_str("TWILIO_FROM"),
            push_provider=_env_str("PUSH_PROVIDER", "null").lower(),
            fcm_api_base=_env_str("FCM_API_BASE", "https://fcm.googleapis.com").rstrip("/"),
            fcm_credentials_file=_env_str("FCM_CREDENTIALS_FILE"),
            whatsapp_provider=_env_str("WHATSAPP_PROVIDER", "null").lower(),
            whatsapp_api_base=_env_str(
                "WHATSAPP_API_BASE", "https://graph.facebook.com/v21.0"
            ).rstrip("/"),
            whatsapp_phone_number_id=_env_str("WHATSAPP_PHONE_NUMBER_ID"),
            whatsapp_access_token=_env_str("WHATSAPP_ACCESS_TOKEN"),
            whatsapp_app_secret=_env_str("WHATSAPP_APP_SECRET"),
            whatsapp_verify_token=_env_str("WHATSAPP_VERIFY_TOKEN"),
            soft_bounce_threshold=_env_int("SOFT_BOUNCE_THRESHOLD", 3),
            rate_per_second=rates,
        ).validated()

    # -- derived -----------------------------------------------------------------

    @property
    def is_production(self) -> bool:
        return self.env == "production"

    @property
    def embedded(self) -> bool:
        """True when no external broker is configured: the single-machine trial mode."""
        return not self.redis_url

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            url = self.database_url
            # Plain postgres URLs mean psycopg 3 here; psycopg2 is not installed.
            for prefix in ("postgres://", "postgresql://"):
                if url.startswith(prefix):
                    return "postgresql+psycopg://" + url[len(prefix) :]
            return url
        return f"sqlite:///{(self.var_dir / 'herald.sqlite3').resolve()}"

    @property
    def broker_url(self) -> str:
        return self.redis_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return (self.var_dir / "broker").resolve()

    def validated(self) -> Settings:
        if self.env not in {"development", "test", "production"}:
            raise ConfigError("HERALD_ENV must be development, test or production")
        for name, value in (("EMAIL_PROVIDER", self.email_provider),):
            if value not in {"smtp", "null"}:
                raise ConfigError(f"{name} must be smtp or null")
        providers = {
            "SMS_PROVIDER": (self.sms_provider, {"twilio", "null"}),
            "PUSH_PROVIDER": (self.push_provider, {"fcm", "null"}),
            "WHATSAPP_PROVIDER": (self.whatsapp_provider, {"cloud", "null"}),
        }
        for name, (value, allowed) in providers.items():
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(sorted(allowed))}")
        for name, seconds in (
            ("HERALD_BEAT_TICK", self.beat_tick),
            ("HERALD_RECONCILE_INTERVAL", self.reconcile_interval),
            ("HERALD_LEASE_SECONDS", self.lease_seconds),
            ("HERALD_DISPATCH_GRACE", self.dispatch_grace),
        ):
            if seconds <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds")
        if self.soft_bounce_threshold < 1:
            raise ConfigError("SOFT_BOUNCE_THRESHOLD must be at least 1")
        if self.jwt_access_token_expires <= 0 or self.jwt_refresh_token_expires <= 0:
            raise ConfigError("JWT token lifetimes must be positive numbers of seconds")
        from engine.crypto import parse_keys  # here: crypto itself imports this module

        parse_keys(self.encryption_key)  # a bad key fails at start-up, not on first use
        if self.is_production:
            self._refuse_default_secrets()
        return self

    def _refuse_default_secrets(self) -> None:
        checks = {
            "SECRET_KEY": (self.secret_key, DEV_SECRET_KEY, 32),
            "JWT_SECRET_KEY": (self.jwt_secret_key, DEV_JWT_SECRET_KEY, 32),
            "ENCRYPTION_KEY": (self.encryption_key, DEV_ENCRYPTION_KEY, 0),
        }
        weak = [
            name
            for name, (value, default, min_length) in checks.items()
            if not value or value == default or len(value) < min_length
        ]
        if weak:
            raise ConfigError(
                "HERALD_ENV=production refuses default or short secrets: " + ", ".join(weak)
            )


_settings: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings


def reset_settings() -> None:
    """Forget cached settings, so tests can change the environment."""
    global _settings
    _settings = None
