"""The one in-memory shape every data format is converted to."""

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One training or evaluation example.

    Chat data fills ``messages`` (dicts with "role" in ROLES and string "content"); raw text for
    continued pretraining fills ``text`` and leaves ``messages`` empty. ``source`` is
    "file:line" (or "file:row N") so any later error can point back at the input.
    """

    messages: list[dict] = field(default_factory=list)
    text: str | None = None
    source: str = "?"

    @property
    def is_chat(self) -> bool:
        return self.text is None

    def key(self) -> str:
        """A canonical string of the content, used to find exact duplicates."""
        if self.text is not None:
            return self.text
        return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in self.messages)
