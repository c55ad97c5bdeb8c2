"""The password policy for new passwords (NIST SP 800-63B style: length and blocklist, no
composition rules)."""

from __future__ import annotations

MIN_LENGTH = 12
MAX_LENGTH = 128

# The most common passwords of public breach corpora (the ones of 12+ characters matter, the
# shorter ones fail the length rule anyway) and the obvious words of this trade.
_COMMON = {
    "123456789012",
    "1234567890123",
    "12345678901234",
    "qwertyuiopasdf",
    "qwertyuiop123",
    "qwerty123456",
    "password1234",
    "password12345",
    "password123456",
    "passwordpassword",
    "iloveyou1234",
    "letmein12345",
    "welcome12345",
    "welcome123456",
    "administrator",
    "administrator1",
    "changeme1234",
    "aaaaaaaaaaaa",
    "abcdefghijkl",
    "abc123abc123",
    "football1234",
    "baseball1234",
    "starwars1234",
    "sunshine1234",
    "princess1234",
    "superman1234",
    "trustno1trustno1",
    "correcthorsebatterystaple",
    "correct horse battery staple",
    "restaurant123",
    "restaurant1234",
    "galleygalley",
    "galley123456",
    "kitchen12345",
    "qazwsxedcrfv",
    "1q2w3e4r5t6y",
    "zaq12wsxcde3",
    "monkey123456",
    "dragon123456",
    "master123456",
}


def problems(password: str, *, email: str, username: str | None = None) -> list[str]:
    """Why ``password`` is not acceptable (empty when it is)."""
    found: list[str] = []
    if len(password) < MIN_LENGTH:
        found.append(f"must be at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        found.append(f"must be at most {MAX_LENGTH} characters")
    lowered = password.lower()
    if lowered in _COMMON or len(set(lowered)) <= 2:
        found.append("is too common")
    email = email.lower()
    local = email.split("@")[0]
    if email in lowered or (len(local) >= 3 and local in lowered):
        found.append("must not contain your email address")
    if username and len(username) >= 3 and username.lower() in lowered:
        found.append("must not contain your username")
    return found
