# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 3 — Training
#
# Training is a loop: take a batch of token windows, predict each next token, measure the
# cross-entropy loss, follow its gradient downhill a little, repeat. We first take one step by
# hand, then run the library's loop (`babyllama.train.train`) on the book's corpus: the `book`
# preset (0.8M parameters) for 210 iterations, under three minutes on two CPU cores.

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

from babyllama import book
from babyllama.data import get_batch, load_shards
from babyllama.model import Transformer
from babyllama.tokenizer import Tokenizer
from babyllama.train import get_lr, make_optimizer, read_log, train

paths = book.Paths.find()
bins = book.ensure_shards(paths, progress=False)   # chapter 1's shards
tok = Tokenizer.from_bin(paths.tok_bin)
cfg = book.book_config(paths, progress=False)
args = cfg.model_args()
print(args)

# %% [markdown]
# ## 3.1 One step by hand
#
# A batch is `batch_size` random windows of `max_seq_len + 1` tokens from the shards; `x` is the
# window without its last token, `y` without its first. Batches are a pure function of
# `(seed, step)`, which is what makes a resumed run see exactly the data it would have seen.

# %%
shards = load_shards(bins, "train")
x, y = get_batch(shards, batch_size=4, seq_len=16, seed=0, step=0)
print("x[0]:", x[0].tolist())
print("y[0]:", y[0].tolist())
print(repr(tok.decode(x[0].tolist())))

# %%
torch.manual_seed(0)
model = Transformer(args)
x, y = (torch.from_numpy(a) for a in get_batch(shards, 8, 64, seed=0, step=0))
_, loss = model(x, y)
loss.backward()
print(f"loss before: {loss.item():.3f}  (ln 512 = {math.log(512):.3f})")
with torch.no_grad():   # plain gradient descent: w <- w - lr * dL/dw
    for p in model.parameters():
        p -= 0.5 * p.grad
        p.grad = None
_, loss_after = model(x, y)
print(f"loss after one SGD step on the same batch: {loss_after.item():.3f}")
assert loss_after < loss

# %% [markdown]
# The real loop uses **AdamW** (per-parameter step sizes from running averages of the gradient
# and its square; weight decay on matrices only, not on the norm weights), a **learning-rate
# schedule** (linear warmup, then cosine decay), **gradient clipping**, and evaluation on
# held-out stories. The schedule of the book run:

# %%
lrs = [get_lr(it, cfg) for it in range(cfg.max_iters)]
fig, ax = plt.subplots(figsize=(6, 2.6))
ax.plot(lrs)
ax.set_xlabel("iteration")
ax.set_ylabel("learning rate")
ax.set_title(f"warmup {cfg.warmup_iters} iterations, cosine to {cfg.min_lr:g}")
plt.show()
opt = make_optimizer(model, cfg)
print([(len(g["params"]), g["weight_decay"]) for g in opt.param_groups])

# %% [markdown]
# ## 3.2 The training run
#
# `train(cfg)` writes `out/book/ckpt.pt` (model, optimizer, config, iteration, RNG state; written
# to a temporary file, then renamed, so a crash never leaves half a checkpoint), a JSON-lines
# log and a loss plot. `babyllama train --resume` continues a run exactly; Ctrl-C saves first.
# With `torchrun --nproc_per_node N -m babyllama train ...` the same loop runs data-parallel.
#
# First a short run of 20 iterations, to see what an early model writes:

# %%
early = train(book.book_config(paths, out_dir=str(paths.out / "book_early"), max_iters=20,
                               eval_interval=0, progress=False))

# %%
# NBVAL_IGNORE_OUTPUT
ckpt = train(cfg)   # ~3 minutes on 2 cores
log = read_log(paths.run_dir / "log.jsonl")
steps = [r for r in log if "loss" in r]
print(f"{steps[-1]['tokens_per_s']:,.0f} tokens/s, model FLOPs utilisation "
      f"{steps[-1]['mfu']:.0%} of this machine's measured matmul peak")
print(f"validation loss after {cfg.max_iters} iterations: "
      f"{[r for r in log if 'val_loss' in r][-1]['val_loss']:.2f} nats/token")

# %%
evals = [r for r in log if "val_loss" in r]
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], lw=1, alpha=0.6,
        label="train (batch)")
ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "s-", label="validation")
ax.set_xlabel("iteration")
ax.set_ylabel("cross-entropy (nats/token)")
ax.legend()
plt.show()
val_loss = evals[-1]["val_loss"]
assert val_loss < 1.6

# %% [markdown]
# How good is that? A **unigram** model — always predict each token with its overall frequency,
# ignoring context — is the baseline any language model must beat:

# %%
counts = np.bincount(np.concatenate([np.asarray(s) for s in shards]), minlength=args.vocab_size)
p_unigram = (counts + 1) / (counts + 1).sum()
val = np.concatenate([np.asarray(s) for s in load_shards(bins, "val")])
unigram_loss = float(-np.log(p_unigram[val]).mean())
print(f"unigram baseline: {unigram_loss:.2f} nats/token")
print(f"the model is below the baseline by more than 2 nats/token: {unigram_loss - val_loss > 2}")

# %% [markdown]
# The trained model is far better than counting tokens: it has learned the stories' grammar,
# names and plot. Samples from the early and the final checkpoints (temperature 0.8):

# %%
# NBVAL_IGNORE_OUTPUT
prompt = tok.encode("Once upon a time", bos=True)
for name, path in (("after 20 iterations", early), (f"after {cfg.max_iters} iterations", ckpt)):
    m = Transformer.from_pretrained(path).eval()
    ids = m.generate(prompt, max_new_tokens=120, temperature=0.8, top_p=0.9, seed=1)
    print(f"--- {name} ---\n{tok.decode(prompt + ids)}\n")

# %% [markdown]
# ## 3.3 Scaling up
#
# The same code trains the llama2.c models on TinyStories:
#
# ```
# babyllama tokenizer train --vocab 4096 --data tinystories
# babyllama pretokenize --vocab 4096 --data tinystories
# babyllama train --preset stories15M --data tinystories --vocab-size 4096 \
#     --batch-size 64 --grad-accum 4 --max-iters 100000 --learning-rate 5e-4 \
#     --dtype bfloat16 --device cuda --compile --out out/stories15M
# ```
#
# (Llama 2's own 32,000-piece tokenizer works too: `babyllama tokenizer export` it, and skip
# `tokenizer train`.) On one GPU that is a few hours; on this book's two CPU cores, stay with
# the `book` and `stories260K` presets.
#
# `--dtype` picks the precision of the forward and backward matmuls (autocast; the weights and
# the optimizer stay fp32). `bfloat16` has fp32's exponent range and needs nothing else.
# `float16` (for GPUs without bf16) has a much smaller range: small gradients round to zero,
# so the loss is multiplied by a large scale before `backward` and the gradients divided by
# it before the step — a `GradScaler`, which also skips any step whose gradients overflowed
# and lowers the scale. Its state goes into the checkpoint with everything else, so a
# float16 run resumes exactly too.
