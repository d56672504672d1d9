"""Prompt templates: packaged files with named placeholders, replaceable by any file via config.

A template is one user message (a .txt file, or a string entry of a JSON file) or a system + user chat (a JSON
list of {"role", "content"} messages, as the paper's evaluation prompt is written in its code). Placeholders are
filled in the user message only.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable, Sequence

from src.config import ConfigError

PROMPT_DIR = Path(__file__).parent
_PLACEHOLDER = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}")


class Template:
    """A prompt with `{name}` placeholders. Only the declared names are substituted, so literal braces
    elsewhere (JSON examples, code) survive, unlike str.format. All placeholders are filled in one pass: a value
    that itself contains `{generation}` is left as written, not filled again."""

    def __init__(self, text: str, origin: str, required: tuple[str, ...], system: str | None = None):
        found = set(_PLACEHOLDER.findall(text))
        missing = [name for name in required if name not in found]
        if missing:
            raise ConfigError(
                f"prompt {origin} lacks placeholder {{{missing[0]}}} (needs {', '.join('{' + r + '}' for r in required)})"
            )
        self.text, self.origin, self.required, self.system = text, origin, required, system

    def fill(self, **values: str) -> str:
        """The user message with every placeholder replaced (one regex pass over the template)."""
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)] if m.group(1) in self.required else m.group(0), self.text)

    def render(self, **values: str) -> str | list[dict]:
        """A prompt for `Generator`: the user message, or [system, user] messages when the template has a system part."""
        user = self.fill(**values)
        if self.system is None:
            return user
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    @property
    def name(self) -> str:
        """Where it came from, short: the file name (plus the JSON entry)."""
        return self.origin.split(" (")[0].rsplit("/", 1)[-1]


def _from_json(data, origin: str, required: tuple[str, ...], key: str) -> Template:
    if isinstance(data, str):
        return Template(data, origin, required)
    roles = [m.get("role") for m in data] if isinstance(data, list) and all(isinstance(m, dict) for m in data) else None
    if roles not in (["user"], ["system", "user"]) or not all(isinstance(m.get("content"), str) for m in data):
        raise ConfigError(f"{key}: {origin} must be a string or a list of messages [system,] user with string 'content'")
    return Template(data[-1]["content"], origin, required, data[0]["content"] if len(data) == 2 else None)


def load_template(path: str | None, default: str, required: tuple[str, ...], key: str) -> Template:
    """Load the packaged template `default` or the file at `path` (config key `key`).

    `path` may be `file.json:name` to take one entry of a JSON file (the paper's prompt_templates.json);
    ':' rather than '#', which Hydra's override grammar does not accept unquoted. A .json file without an entry
    holds one template (a string or a message list).
    """
    if path is None:
        file, entry, origin = PROMPT_DIR / default, "", str(PROMPT_DIR / default)
    else:
        file_part, entry = str(path), ""
        if ".json:" in file_part:
            file_part, _, entry = file_part.rpartition(":")
        file, origin = Path(file_part).expanduser(), f"{path} ({key})"
        if not file.is_file():
            raise ConfigError(f"{key}: prompt file {file} does not exist")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{key}: prompt file {file} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
    if file.suffix != ".json":
        return Template(text, origin, required)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}: prompt file {file} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if entry:
        if entry not in data:
            raise ConfigError(f"{key}: {file} has no entry {entry!r} (has: {', '.join(data)})")
        data = data[entry]
    return _from_json(data, origin, required, key)


def text_fingerprint(template: Template) -> str:
    """What of a template goes into a cache key: its text, not where it came from."""
    text = template.text if template.system is None else f"{template.system}\0{template.text}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def clip_end(text: str, limit: int) -> str:
    """The first `limit` characters, marked as cut."""
    return text if len(text) <= limit else text[:limit] + " [...]"


def clip_middle(text: str, limit: int) -> str:
    """Keep the head and the tail: a multi-turn transcript ends with the question being judged, and a long
    instruction states its task at either end."""
    if len(text) <= limit:
        return text
    head = limit // 3
    return text[:head] + " [...] " + text[len(text) - (limit - head) :]


def fit_to_budget(render_at: Callable[[int, int | None], object], sizes: Sequence[int], count: Callable[[list], list[int]],
                  budget: int, what: str) -> tuple[list[object], list[int | None]]:
    """Prompts that fit `budget` tokens, each cut as little as needed. `render_at(i, limit)` renders prompt i with its
    long parts cut to `limit` characters (None: as configured), `sizes[i]` is how many characters of them the
    configured rendering shows, `count` a model's count_tokens. Returns (prompts, each one's limit or None where
    the configured rendering fitted). Each round cuts an over-budget prompt's limit by at least a tenth (chars per
    token of what is shown, 0.9 to converge from below), so the loop ends; a prompt that cannot fit with one
    character shown means the config leaves no room: a ConfigError naming `what`."""
    limits: list[int | None] = [None] * len(sizes)
    prompts = [render_at(i, None) for i in range(len(sizes))]
    todo = list(range(len(sizes)))
    while todo:
        over = [(i, n) for i, n in zip(todo, count([prompts[i] for i in todo])) if n > budget]
        for i, n in over:
            shown = limits[i] or sizes[i]
            limit = min(int(shown * budget / n * 0.9), shown - 1)
            if limit < 1:
                raise ConfigError(f"{what}: the prompt does not fit {budget} tokens even with one character of its "
                                  f"input shown ({n} tokens): raise the model's max_model_len or lower max_new_tokens")
            limits[i], prompts[i] = limit, render_at(i, limit)
        todo = [i for i, _ in over]
    return prompts, limits
