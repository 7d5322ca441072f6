"""Building the public (cloud) and private (device) chat prompts.

The cloud sees only the public messages: the system prompt and the user's request.
The device's "with context" stream sees the private context first, then the same
request, inside the same user turn:

    system: <system prompt>
    user:   For reference, here is some information about me:

            <context: each file, then --context-text, separated by blank lines>

            My request:
            <the user's request>

Context first gives every request with the same context the same token prefix, so
the device can reuse that prefix's prefill (`context_cache/`); CoGenesis, the
evaluation data, is laid out the same way (profile and history, then the task).

A conversation (system, user and assistant turns) gets the context the same way, in
its first user turn: a single request is the one-turn case, and every turn of a
conversation with the same context keeps that prefix too.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Mapping, Sequence

from .errors import UserError

log = logging.getLogger(__name__)

PAPER_SYSTEM_PROMPT = "You are a helpful assistant."
MAX_CONTEXT_FILE_BYTES = 16 * 1024 * 1024
CONTEXT_INTRO = "For reference, here is some information about me:"
REQUEST_INTRO = "My request:"


class PublicChat(list):
    """Messages the cloud may see: the system prompt and the user's request. A remote
    cloud accepts nothing else (see `cloud.RemoteCloud.encode_chat`)."""


class PrivateChat(list):
    """Messages that hold the private context: for the device model only."""


def declassify(chat: PrivateChat) -> PublicChat:
    """Let private messages go to the cloud: only for an explicit user request
    (`--send-private-context-to-cloud`), never by default."""
    return PublicChat(chat)


@dataclass(frozen=True)
class PromptPair:
    """The two conversations one generation needs: what the cloud may see, what only the device sees."""

    public: PublicChat
    private: PrivateChat

    def __post_init__(self) -> None:
        # accept plain lists of messages, and give them their privacy type
        object.__setattr__(self, "public", PublicChat(self.public))
        object.__setattr__(self, "private", PrivateChat(self.private))


CONTEXT_SUFFIXES = (".txt", ".md", ".json")
ROLES = ("system", "user", "assistant")


STDIN = "-"  # `--context -`: the context comes on stdin, so it never appears in a command line
INLINE_TEXT_WARNING = ("costeer: warning: --context-text puts the private context on the command line, where other "
                       "local users can read it (ps, /proc/PID/cmdline); prefer --context FILE or --context - (stdin)")


def _context_files(files: Sequence[str | Path]) -> list[Path | None]:
    """The files given, with a folder standing for its own .txt, .md and .json files
    in name order (not its subfolders; hidden files skipped); None stands for stdin."""
    paths: list[Path | None] = []
    for f in files:
        if str(f) == STDIN:
            if None in paths:
                raise UserError("--context - (stdin) can be given once only")
            paths.append(None)
            continue
        path = Path(f)
        if not path.is_dir():
            paths.append(path)
            continue
        found = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in CONTEXT_SUFFIXES and not p.name.startswith("."))
        if not found:
            raise UserError(f"context folder {path} holds no {', '.join(CONTEXT_SUFFIXES)} files")
        paths.extend(found)
    return paths


def _read_stdin(stdin: BinaryIO) -> bytes:
    """Stdin's bytes, refused past the file limit without reading more than one byte beyond it."""
    try:
        data = stdin.read(MAX_CONTEXT_FILE_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read the context from stdin: {exc.strerror}") from None
    if len(data) > MAX_CONTEXT_FILE_BYTES:
        raise UserError(f"the context on stdin is over {MAX_CONTEXT_FILE_BYTES:,} bytes, the limit "
                        "(a private context is notes and a profile, not a corpus)")
    return data


def _read_context_file(path: Path) -> bytes:
    if not path.is_file():
        raise UserError(f"context file not found: {path}")
    try:
        size = path.stat().st_size
        if size > MAX_CONTEXT_FILE_BYTES:  # before reading it all into memory
            raise UserError(f"context file {path} is {size:,} bytes; the limit is {MAX_CONTEXT_FILE_BYTES:,} "
                            "(a private context is notes and a profile, not a corpus)")
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read context file {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class ContextSource:
    """One source of the private context: `name` (the path as given, "<stdin>" or
    "--context-text"), `size_bytes` as read, and `text` as it goes into the context."""

    name: str
    size_bytes: int
    text: str


def load_context_sources(files: Sequence[str | Path] = (), text: str | None = None, *,
                         text_from_command_line: bool = False, stdin: BinaryIO | None = None) -> list[ContextSource]:
    """`load_context`'s sources one by one, for what shows them by name (the proxy's chat page)."""
    if text is not None and text_from_command_line:
        log.warning(INLINE_TEXT_WARNING)
    sources: list[ContextSource] = []
    for path in _context_files(files):
        if path is None:
            if stdin is None and sys.stdin is None:  # started with stdin closed
                raise UserError("--context - reads stdin, but this process has none")
            data = _read_stdin(stdin if stdin is not None else sys.stdin.buffer)
            path = Path("<stdin>")  # names the source in messages, like a file's path
        else:
            data = _read_context_file(path)
        try:
            raw = data.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"context file is not UTF-8 text: {path}") from None
        if "\x00" in raw:
            raise UserError(f"context file is binary, not text: {path}")
        if not raw.strip():
            raise UserError(f"context file is empty: {path}")
        if path.suffix.lower() == ".json":
            try:
                raw = json_to_text(json.loads(raw))
            except json.JSONDecodeError as exc:  # position only: never echo private content
                raise UserError(f"context file {path} is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
        if raw.strip():  # a JSON file may render to nothing
            sources.append(ContextSource(str(path), len(data), raw.strip()))
    if text and text.strip():
        sources.append(ContextSource("--context-text", len(text.encode("utf-8")), text.strip()))
    return sources


def join_context(sources: Sequence[ContextSource]) -> str:
    return "\n\n".join(source.text for source in sources)


def load_context(files: Sequence[str | Path] = (), text: str | None = None, *,
                 text_from_command_line: bool = False, stdin: BinaryIO | None = None) -> str:
    """Concatenate context sources: files (plain text, Markdown or JSON; a folder: its
    files in name order; "-": stdin, read as plain text) then inline text.

    `text_from_command_line`: `text` came from argv, so warn (one line on stderr) that
    other local users can read it. `stdin`: where "-" reads from (default sys.stdin's bytes)."""
    return join_context(load_context_sources(files, text, text_from_command_line=text_from_command_line, stdin=stdin))


def json_to_text(value: object, indent: int = 0) -> str:
    """Readable Markdown-ish text from JSON: keys become labels, lists become bullets."""
    pad = "  " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                lines.append(f"{pad}{key}:\n{json_to_text(item, indent + 1)}")
            else:
                lines.append(f"{pad}{key}: {item}")
        return "\n".join(lines)
    if isinstance(value, list):
        return "\n".join(
            f"{pad}- {json_to_text(item, indent + 1).lstrip()}" if isinstance(item, (dict, list)) else f"{pad}- {item}"
            for item in value
        )
    return f"{pad}{value}"


def with_context(prompt: str, context: str) -> str:
    if not context:
        return prompt
    return f"{CONTEXT_INTRO}\n\n{context}\n\n{REQUEST_INTRO}\n{prompt}"


def build_prompts(prompt: str | Sequence[Mapping[str, str]], context: str = "",
                  system_prompt: str | None = PAPER_SYSTEM_PROMPT) -> PromptPair:
    """`prompt`: the request, or a conversation of system, user and assistant turns.
    A conversation with a system message of its own does not get `system_prompt`; the
    private one holds the context in its first user turn (a request is the one-turn case)."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    for turn in turns:
        if turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise UserError(f"a message must have a role ({', '.join(ROLES)}) and text content")
    users = [i for i, turn in enumerate(turns) if turn["role"] == "user"]
    if not users or not any(turns[i]["content"].strip() for i in users):
        raise UserError("the prompt is empty")
    if system_prompt and not any(turn["role"] == "system" for turn in turns):
        turns.insert(0, {"role": "system", "content": system_prompt})
        users = [i + 1 for i in users]
    private = [dict(turn) for turn in turns]
    private[users[0]]["content"] = with_context(private[users[0]]["content"], context)
    return PromptPair(public=PublicChat(turns), private=PrivateChat(private))
