"""Secrets never written: the config, checkpoints, W&B and prepared data's meta.json go through scrub()."""

from __future__ import annotations

import re

# keys whose values are secrets, and values shaped like the secrets people paste: Hugging Face, W&B
# (40 hex), OpenAI-style, GitHub (classic and fine-grained), AWS access keys, Slack, JWTs, PEM blocks
SECRET_KEY = re.compile(
    r"api_?key|secret|password|passwd|credential|token|private_?key|auth(?!or)|cookie|session_?key", re.I
)
# a 40-hex path component is a commit (a Hub cache's snapshots/<sha>), not a W&B key: a path keeps it;
# sk- starts a key only where a word starts (not inside task-classification)
SECRET_VALUE = re.compile(
    r"hf_[A-Za-z0-9]{20,}|(?<![/\w])[0-9a-f]{40}(?![/\w])|(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{20,}"
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_\w{30,}"
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|xox[abposr]-[A-Za-z0-9-]{10,}|eyJ[\w-]{10,}\.[\w-]{10,}\.[\w-]{10,}"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[^-]*(?:-----END [A-Z ]*PRIVATE KEY-----)?"
)
URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@", re.I)
REDACTED = "<redacted>"


def scrub_text(text: str) -> str:
    """`text` with every secret-shaped part replaced; credentials inside a URL lose user and password."""
    text = URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    return SECRET_VALUE.sub(REDACTED, text)


def scrub_name(name: str) -> str:
    """A name made from user input (a cache folder's, a W&B group's) without secret-shaped parts;
    "redacted" rather than "<redacted>", which is no file name."""
    return SECRET_VALUE.sub("redacted", URL_CREDENTIALS.sub(r"\g<scheme>redacted@", name))


def scrub(value):
    """A config without secrets: values under secret-sounding keys, and secret-shaped text anywhere
    (see SECRET_VALUE), become "<redacted>". Keys such as max_tokens are not secrets."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_key(k) and v else scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return scrub_text(value)
    return value


NOT_SECRET_KEY = re.compile(r"tokenizer|tokens|token_id|eot_token|per_token", re.I)  # this project's own fields


def is_secret_key(key) -> bool:
    key = str(key).rsplit(".", 1)[-1]
    return bool(SECRET_KEY.search(key)) and not NOT_SECRET_KEY.search(key)
