"""Secret environment values at rest (README.md "Secrets at rest").

A secret variable's value is stored sealed: `enc1:<digest>:<Fernet token>`. The web app seals
what users send and never opens a sealed value; the worker opens it (`reveal`) only to start an
instance, so the plain value exists in the instance's environment and the worker's memory, and
nowhere else: not in the database, a draft, an answer, an event, a log line or a workflow
history (LifecycleSpec and StartInstanceInput carry no env; docs/architecture.md decision 20).

- **Keys.** Fernet keys (AES-128-CBC + HMAC-SHA256), newest first, from `STANDBY_SECRETS_KEYS`
  (comma-separated), else from the file `<data dir>/secrets.key` (0600), made on first use.
  Workers on other hosts need the same keys: set STANDBY_SECRETS_KEYS on every part.
- **The digest** is an HMAC of the value under a key derived from each Fernet key, so the web app
  can tell that a value sent again equals the stored one (an `apply` of the same file changes
  nothing) without opening it. Any of the keys may have made it.
- **Rotation**: put a new key first (`STANDBY_SECRETS_KEYS=new,old`) on every part and restart
  them; `python app.py rotate-secrets` seals every stored value again with the new key; then drop
  the old key. Values sealed with a key no longer listed cannot be opened.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEALED_PREFIX = "enc1:"
KEY_FILE = "secrets.key"


class SecretsKeyError(ValueError):
    """A sealed value that none of the configured keys opens, or a key that is not a Fernet key."""


def _digest_key(fernet_key: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"standby secret value digest").derive(base64.urlsafe_b64decode(fernet_key))


class SecretBox:
    def __init__(self, keys: list[bytes]):
        if not keys:
            raise SecretsKeyError("no secrets key configured")
        try:
            self._fernet = MultiFernet([Fernet(key) for key in keys])
        except ValueError as exc:
            raise SecretsKeyError("STANDBY_SECRETS_KEYS must be Fernet keys (32 url-safe base64-encoded bytes), "
                                  "comma-separated, newest first") from exc
        self._digest_keys = [_digest_key(key) for key in keys]

    def _digest(self, value: str, key: bytes) -> str:
        return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32]

    def seal(self, value: str) -> str:
        token = self._fernet.encrypt(value.encode()).decode()
        return f"{SEALED_PREFIX}{self._digest(value, self._digest_keys[0])}:{token}"

    def matches(self, stored: str, value: str) -> bool:
        """Whether a stored value (sealed, or plain from before sealing) holds `value`."""
        if not is_sealed(stored):
            return hmac.compare_digest(stored.encode(), value.encode())
        digest = stored[len(SEALED_PREFIX):].split(":", 1)[0]
        return any(hmac.compare_digest(digest, self._digest(value, key)) for key in self._digest_keys)

    def reveal(self, stored: str) -> str:
        """The plain value. The worker's business only, when it starts an instance (and the
        operator's `app.py rotate-secrets`): the web app never calls this."""
        if not is_sealed(stored):
            return stored  # from before sealing existed; sealed at the next start of web or worker
        token = stored[len(SEALED_PREFIX):].split(":", 1)[1]
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise SecretsKeyError("a secret value was sealed with a key this process does not have: give it the "
                                  "same STANDBY_SECRETS_KEYS as the web app (README.md \"Secrets at rest\")") from None

    def reseal(self, stored: str) -> str:
        """The value sealed again with the newest key (rotation)."""
        return self.seal(self.reveal(stored))


def is_sealed(value) -> bool:
    return isinstance(value, str) and value.startswith(SEALED_PREFIX)


def _key_file(data_dir: Path) -> bytes:
    path = Path(data_dir) / KEY_FILE
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    key = Fernet.generate_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another part wrote it first
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as handle:
        handle.write(key + b"\n")
    return key


@functools.lru_cache(maxsize=16)
def _box(data_dir: str, keys: str) -> SecretBox:
    configured = [key.strip().encode() for key in keys.split(",") if key.strip()]
    return SecretBox(configured or [_key_file(Path(data_dir))])


def box_for(settings) -> SecretBox:
    """The keys of this installation (common/config.py `secrets_keys`, else the data dir's file)."""
    return _box(str(settings.data_dir), settings.secrets_keys)


def seal_env(env: list[dict], box: SecretBox) -> tuple[list[dict], bool]:
    """`env` with every secret value sealed; whether anything changed."""
    out, changed = [], False
    for item in env or []:
        if item.get("secret") and item.get("value") and not is_sealed(item["value"]):
            item = {**item, "value": box.seal(item["value"])}
            changed = True
        out.append(item)
    return out, changed


def reveal_env(env: list[dict], box: SecretBox) -> dict[str, str]:
    """KEY -> plain value of every variable, for an instance's environment (the worker only)."""
    return {item["key"]: (box.reveal(item.get("value") or "") if item.get("secret") else item.get("value") or "")
            for item in env or []}


def seal_stored_values(database_url: str, box: SecretBox, *, reseal: bool = False) -> int:
    """Seal every stored secret value still in plain text (from before sealing existed); with
    `reseal`, seal every value again with the newest key (rotation). Returns how many changed."""
    from sqlalchemy import select

    from common.db import Database
    from common.models import Endpoint, Revision

    def sealed(env: list[dict] | None) -> tuple[list[dict], int]:
        out, changed = [], 0
        for item in env or []:
            value = item.get("value") or ""
            if item.get("secret") and value and (reseal or not is_sealed(value)):
                item = {**item, "value": box.reseal(value) if reseal else box.seal(value)}
                changed += 1
            out.append(item)
        return out, changed

    database = Database(database_url)
    count = 0
    try:
        with database.session() as session:
            for endpoint in session.scalars(select(Endpoint)):
                env, changed = sealed(endpoint.env)
                if changed:
                    endpoint.env = env
                    count += changed
            # A revision keeps the environment it runs with (README.md "Revisions and updates").
            for revision in session.scalars(select(Revision)):
                env, changed = sealed((revision.spec or {}).get("env"))
                if changed:
                    revision.spec = {**revision.spec, "env": env}
                    count += changed
    finally:
        database.engine.dispose()
    return count
