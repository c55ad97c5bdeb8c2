"""The password policy for new passwords (NIST SP 800-63B style: length and a check against
common and easily guessed passwords, no composition rules).

Guessability comes from ``zxcvbn`` (Dropbox's estimator: frequency lists of breached passwords,
common words and names, keyboard patterns, l33t substitutions), given the user's email and
username so that variations of them count as guessable too.
"""

from __future__ import annotations

from zxcvbn import zxcvbn

MIN_LENGTH = 12
MAX_LENGTH = 128
#: zxcvbn score (0-4) a new password needs; 3 means "safely unguessable" (≥ 10^8 guesses).
MIN_SCORE = 3


def problems(password: str, *, email: str, username: str | None = None) -> list[str]:
    """Why ``password`` is not acceptable (empty when it is)."""
    found: list[str] = []
    if len(password) < MIN_LENGTH:
        found.append(f"must be at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        return [*found, f"must be at most {MAX_LENGTH} characters"]
    lowered = password.lower()
    email = email.lower()
    local = email.split("@")[0]
    if email in lowered or (len(local) >= 3 and local in lowered):
        found.append("must not contain your email address")
    if username and len(username) >= 3 and username.lower() in lowered:
        found.append("must not contain your username")
    inputs = [email, local, *([username] if username else [])]
    if password and zxcvbn(password, user_inputs=inputs)["score"] < MIN_SCORE:
        found.append("is too common or too easy to guess")
    return found
