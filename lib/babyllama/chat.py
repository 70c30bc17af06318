"""Llama 2's chat template, exactly as llama2.c's run.c renders it (`-m chat`).

    from babyllama.chat import render_turn, encode_turn
    render_turn("Tell me a story.", system="Be brief.")
    # -> '[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nTell me a story. [/INST]'
    ids = encode_turn(tokenizer, "Tell me a story.")       # BOS + the rendered turn

The system prompt goes into the first turn only; every turn is encoded on its own with a BOS in
front (run.c calls encode(..., bos=1, eos=0) per turn), and a turn of the assistant ends at EOS.
Fine-tuning renders its training sequences with the same function, so the model is trained on
exactly the ids it is later prompted with. No torch here: every engine uses it.
"""

from __future__ import annotations

from typing import Protocol

SYSTEM_TEMPLATE = "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
USER_TEMPLATE = "[INST] {user} [/INST]"


class Encoder(Protocol):
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...


def render_turn(user: str, system: str | None = None, first: bool = True) -> str:
    """The text of one user turn; `system` is used only on the first turn, as in run.c."""
    if first and system:
        return SYSTEM_TEMPLATE.format(system=system, user=user)
    return USER_TEMPLATE.format(user=user)


def encode_turn(tokenizer: Encoder, user: str, system: str | None = None,
                first: bool = True) -> list[int]:
    """BOS + the rendered turn, the ids run.c feeds the model for this turn."""
    return tokenizer.encode(render_turn(user, system, first), bos=True, eos=False)
