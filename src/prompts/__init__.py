"""Prompt templates: packaged text files with named placeholders, replaceable by any file via config."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..config import ConfigError

PROMPT_DIR = Path(__file__).parent
_PLACEHOLDER = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}")


class Template:
    """A prompt with `{name}` placeholders. Only the declared names are substituted, so literal braces
    elsewhere (JSON examples, code) survive, unlike str.format."""

    def __init__(self, text: str, origin: str, required: tuple[str, ...]):
        found = set(_PLACEHOLDER.findall(text))
        missing = [name for name in required if name not in found]
        if missing:
            raise ConfigError(
                f"prompt {origin} lacks placeholder {{{missing[0]}}} (needs {', '.join('{' + r + '}' for r in required)})"
            )
        self.text, self.origin, self.required = text, origin, required

    def render(self, **values: str) -> str:
        out = self.text
        for name in self.required:
            out = out.replace("{" + name + "}", values[name])
        return out


def load_template(path: str | None, default: str, required: tuple[str, ...], key: str) -> Template:
    """Load the packaged template `default` or the file at `path` (config key `key`).

    `path` may be `file.json:name` to take one entry of a JSON file (the paper's prompt_templates.json);
    ':' rather than '#', which Hydra's override grammar does not accept unquoted.
    """
    if path is None:
        file = PROMPT_DIR / default
        return Template(file.read_text(), str(file), required)
    file_part, entry = str(path), ""
    if ".json:" in file_part:
        file_part, _, entry = file_part.rpartition(":")
    file = Path(file_part).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}: prompt file {file} does not exist")
    text = file.read_text()
    if entry:
        data = json.loads(text)
        if entry not in data:
            raise ConfigError(f"{key}: {file} has no entry {entry!r} (has: {', '.join(data)})")
        text = data[entry]
    return Template(text, f"{path} ({key})", required)


def text_fingerprint(template: Template) -> str:
    """What of a template goes into a cache key: its text, not where it came from."""
    import hashlib

    return hashlib.sha256(template.text.encode()).hexdigest()[:16]
