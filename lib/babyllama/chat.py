"""Llama 2's chat template, exactly as llama2.c's run.c renders it (`-m chat`).

    from babyllama.chat import render_turn, encode_turn
    render_turn("Tell me a story.", system="Be brief.")
    # -> '[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nTell me a story. [/INST]'
    ids = encode_turn(tokenizer, "Tell me a story.")       # BOS + the rendered turn
    session = ChatSession(NumpyLlama.load("out/chat.bin"), tokenizer, system="Be brief.")
    reply_ids = session.turn("Tell me a story.")          # the KV cache stays for the next turn

    babyllama chat out/chat.bin -z out/tok512.bin -y "Be brief." --engine numpy

The system prompt goes into the first turn only; every turn is encoded on its own with a BOS in
front (run.c calls encode(..., bos=1, eos=0) per turn), and a turn of the assistant ends at EOS.
Fine-tuning renders its training sequences with the same function, so the model is trained on
exactly the ids it is later prompted with. No torch imported here: every engine uses it.
"""

from __future__ import annotations

from typing import Protocol

from babyllama.tokenizer import EOS

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


# ----------------------------------------------------------------------------------------------
# a conversation over any engine


class ChatSession:
    """A conversation as run.c's chat mode has it, over any engine with `args`,
    `prefill(tokens, pos)` and `sample(logits, temperature, topp, rng)`.

    One KV cache lives across the turns (a babyllama.context.Context): a turn feeds only its new
    tokens — the previous reply's EOS, then BOS and the rendered turn — in one prefill
    call; a reply is sampled token by token and ends at EOS. Past the context the cache shifts
    (n_keep tokens kept); with context_shift=False a turn that does not fit is a ValueError.
    `steps` > 0 caps the positions of the whole conversation, as run.c's -n; `fed` records
    every list of ids given to the model, in order."""

    def __init__(self, engine, tokenizer: Encoder, system: str | None = None,
                 temperature: float = 1.0, topp: float = 0.9, seed: int | None = None,
                 steps: int = 0, n_keep: int = 1, context_shift: bool = True):
        from babyllama.context import Context
        from babyllama.inference_numpy import XorShiftRng, check_sampling, random_seed

        check_sampling(temperature, topp)
        a = engine.args
        self.engine, self.tokenizer, self.system = engine, tokenizer, system
        self.temperature, self.topp, self.steps = temperature, topp, steps
        self.ctx = Context(engine.prefill, a.max_seq_len, n_keep, context_shift,
                           a.vocab_size)
        self.rng = XorShiftRng(seed if seed is not None else random_seed())
        self.fed: list[list[int]] = []
        self.pos = 0             # positions fed in the whole conversation (run.c's pos)
        self.turns = 0
        self.pending_eos = False
        if hasattr(engine, "reset"):
            engine.reset()

    @property
    def over(self) -> bool:
        return self.steps > 0 and self.pos >= self.steps

    def _feed(self, ids: list[int]):
        logits = self.ctx.feed(ids)   # raises before changing anything when it cannot
        self.fed.append(ids)
        self.pos += len(ids)
        return logits

    def turn(self, user: str) -> list[int]:
        """The reply's token ids (without its EOS) to one user turn."""
        return list(self.stream(user))

    def stream(self, user: str):
        """Yield the reply's token ids as they are sampled."""
        if self.over:
            raise ValueError(f"the conversation has used its {self.steps} steps")
        ids = encode_turn(self.tokenizer, user, self.system, first=self.turns == 0)
        logits = self._feed([EOS, *ids] if self.pending_eos else ids)
        self.turns += 1
        self.pending_eos = False
        while True:
            nxt = self.engine.sample(logits, self.temperature, self.topp, self.rng)
            if nxt == EOS:   # fed with the next turn, as run.c feeds it
                self.pending_eos = True
                return
            yield nxt
            if self.over:
                return
            logits = self._feed([nxt])


class TorchEngine:
    """A PyTorch Transformer behind the engines' interface (forward, prefill, generate), sampled
    with run.c's sampler, so `--engine torch` samples, streams and stops as NumPy and C do, and
    a seed means the same tokens."""

    def __init__(self, model):
        self.model, self.args = model.eval(), model.params

    def reset(self) -> None:
        self.model.reset_cache()

    def forward_tokens(self, tokens: list[int], pos: int):   # model.forward_tokens: no grad
        return self.model.forward_tokens(tokens, pos).float().numpy()

    def prefill(self, tokens: list[int], pos: int):
        return self.forward_tokens(tokens, pos)[-1]

    def forward(self, token: int, pos: int):
        return self.forward_tokens([token], pos)[0]

    def sample(self, logits, temperature: float, topp: float, rng) -> int:
        from babyllama.inference_numpy import sample

        return sample(logits, temperature, topp, rng)

    def generate(self, prompt_ids: list[int], steps: int, temperature: float = 1.0,
                 topp: float = 0.9, seed: int | None = None, context_shift: bool = True,
                 n_keep: int = 1):
        """Tokens after the prompt, as NumpyLlama.generate (the same shared loop)."""
        from babyllama.inference_numpy import generate_loop

        yield from generate_loop(self, prompt_ids, steps, temperature, topp, seed,
                                 context_shift, n_keep)
