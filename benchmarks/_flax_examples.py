"""Flax's own example models (``examples/lm1b``, ``examples/gemma``), loaded at run time.

Nothing of Flax's examples is copied into this repository: the files are read from a git mirror
of Flax (``git show HEAD:<path>``) into a temporary directory and imported from there, unchanged.
Only a missing *third-party* top-level module that an example imports for type annotations
(``jaxtyping``) is stubbed when it is not installed; the stub is a file in the temporary directory,
never in this repository, and it leaves ``sys.modules`` afterwards.

>>> ex = load_lm1b()                                  # doctest: +SKIP
>>> loss = ex.loss(ex.params, ex.tokens(seq=64))      # doctest: +SKIP

Both loaders return an :class:`Example`: the model object, its parameters (a pytree), a training
loss ``loss(params, tokens) -> scalar`` and a ``tokens(seq, batch=2, seed=0)`` batch maker
(random ids in ``1..vocab-1``, the last quarter of row 1 padded with the pad id 0).
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_REPO = "/work/.mirror/google+flax/repo"
REPO_ENV = "LEPTON_FLAX_MIRROR"

_LM1B_FILES = ("models.py",)
# What examples/gemma/transformer.py imports (directly or through its imports).
_GEMMA_FILES = ("transformer.py", "transformer_cfg.py", "modules.py", "layers.py",
                "positional_embeddings.py", "params.py", "sow_lib.py", "helpers.py")

# Stub for a third-party package the Gemma example imports only for type annotations
# (``from jaxtyping import Array``). Used only when jaxtyping is not installed.
_JAXTYPING_STUB = '''"""STUB written by lepton_jax benchmarks/_flax_examples.py, NOT the jaxtyping package.

Flax's examples/gemma imports ``Array`` from jaxtyping for annotations only; jaxtyping is not
installed here, so this stand-in maps it to ``jax.Array``."""
import jax
Array = jax.Array
'''


@dataclasses.dataclass(frozen=True)
class Example:
  """One Flax example model at a tiny config.

  Attributes:
    name: ``"lm1b"`` or ``"gemma"``.
    model: the Flax module (linen ``TransformerLM`` / NNX ``Transformer``).
    config: the example's own ``TransformerConfig`` instance.
    params: the trainable parameters (linen variables dict / ``nnx.State`` of ``nnx.Param``).
    loss: ``loss(params, tokens) -> scalar`` in the training form.
    vocab: vocabulary size (token ids are ``0..vocab-1``, 0 is padding).
    source: ``{"repo", "commit", "files"}`` of what was loaded.
  """
  name: str
  model: Any
  config: Any
  params: Any
  loss: Callable
  vocab: int
  source: dict

  def tokens(self, seq: int, batch: int = 2, seed: int = 0) -> jax.Array:
    """Random ``int32`` ids ``[batch, seq]`` in ``1..vocab-1``; row 1 ends with ``seq // 4`` pads."""
    rng = np.random.default_rng(seed)
    tok = rng.integers(1, self.vocab, (batch, seq))
    if batch > 1:
      tok[1, seq - seq // 4:] = 0
    return jnp.asarray(tok, jnp.int32)


def _git(repo: str, *args: str) -> bytes:
  return subprocess.run(["git", f"--git-dir={repo}", *args], check=True,
                        capture_output=True).stdout


def _check_repo(repo: str | None) -> str:
  repo = repo or os.environ.get(REPO_ENV) or DEFAULT_REPO
  if not os.path.isdir(repo):
    raise FileNotFoundError(
        f"flax_examples: repo={repo!r} does not exist; pass repo= (or set ${REPO_ENV}) to a git "
        f"clone or bare mirror of https://github.com/google/flax")
  try:
    _git(repo, "rev-parse", "--verify", "HEAD")
  except subprocess.CalledProcessError as e:
    raise FileNotFoundError(f"flax_examples: repo={repo!r} is not a git repository with a HEAD "
                            f"commit ({e.stderr.decode().strip()})") from None
  return repo


def _extract(repo: str, subdir: str, files: tuple[str, ...]) -> tuple[str, str]:
  """Writes ``HEAD:examples/<subdir>/<file>`` for each file into a fresh temporary directory."""
  commit = _git(repo, "rev-parse", "HEAD").decode().strip()
  dest = tempfile.mkdtemp(prefix=f"lepton_flax_{subdir}_")
  atexit.register(shutil.rmtree, dest, True)
  for f in files:
    path = f"examples/{subdir}/{f}"
    try:
      data = _git(repo, "show", f"HEAD:{path}")
    except subprocess.CalledProcessError:
      raise FileNotFoundError(f"flax_examples: {path} is not in {repo} at HEAD ({commit[:12]}); "
                              "this Flax checkout has no such example file") from None
    with open(os.path.join(dest, f), "wb") as fh:
      fh.write(data)
  return dest, commit


def _import_from(dest: str, names: tuple[str, ...]) -> dict[str, Any]:
  """Imports the example modules ``names`` from ``dest`` (their own flat ``import helpers`` style).

  The examples' module names (``params``, ``layers``, ...) are generic, so they are only visible in
  ``sys.modules`` while importing; afterwards any previous modules of those names are restored.
  """
  stubs = []
  if importlib.util.find_spec("jaxtyping") is None:
    with open(os.path.join(dest, "jaxtyping.py"), "w") as fh:
      fh.write(_JAXTYPING_STUB)
    stubs.append("jaxtyping")
  shadowed = set(names) | set(stubs) | {os.path.splitext(f)[0] for f in os.listdir(dest)}
  saved = {n: sys.modules.pop(n) for n in shadowed if n in sys.modules}
  sys.path.insert(0, dest)
  try:
    importlib.invalidate_caches()
    return {n: importlib.import_module(n) for n in names}
  finally:
    sys.path.remove(dest)
    for n in shadowed:
      sys.modules.pop(n, None)
    sys.modules.update(saved)


def _weighted_xent(logits, targets, weights):
  """Mean over weighted positions of ``-log softmax(logits)[target]`` (label smoothing 0)."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logp.dtype)
  per_pos = -jnp.sum(onehot * logp, axis=-1)
  return jnp.sum(per_pos * weights) / jnp.sum(weights)


def load_lm1b(repo: str | None = None, *, vocab: int = 128, emb_dim: int = 32, num_heads: int = 4,
              num_layers: int = 2, mlp_dim: int = 64, max_len: int = 2048, seed: int = 0) -> Example:
  """Flax ``examples/lm1b/models.py``'s ``TransformerLM`` at a tiny config (dropout off).

  The loss is lm1b's training loss (``train.py``'s ``loss_fn``): the model sees the tokens
  (``shift_inputs`` inside), the targets are the tokens themselves, weights ``tokens > 0``, and
  the weighted cross-entropy is divided by the weight sum.
  """
  repo = _check_repo(repo)
  dest, commit = _extract(repo, "lm1b", _LM1B_FILES)
  models = _import_from(dest, ("models",))["models"]
  cfg = models.TransformerConfig(
      vocab_size=vocab, output_vocab_size=vocab, emb_dim=emb_dim, num_heads=num_heads,
      num_layers=num_layers, qkv_dim=emb_dim, mlp_dim=mlp_dim, max_len=max_len,
      dropout_rate=0.0, attention_dropout_rate=0.0, deterministic=True)
  model = models.TransformerLM(cfg)
  params = jax.jit(model.init)(jax.random.key(seed), jnp.ones((1, 8), jnp.int32))["params"]

  def loss(params, tokens):
    logits = model.apply({"params": params}, tokens)
    return _weighted_xent(logits, tokens, (tokens > 0).astype(jnp.float32))

  return Example("lm1b", model, cfg, params, loss, vocab,
                 dict(repo=repo, commit=commit, files=[f"examples/lm1b/{f}" for f in _LM1B_FILES]))


def load_gemma(repo: str | None = None, *, vocab: int = 128, embed_dim: int = 32,
               num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 8, hidden_dim: int = 64,
               num_layers: int = 2, seed: int = 0) -> Example:
  """Flax ``examples/gemma/transformer.py``'s NNX ``Transformer`` at a tiny config.

  The config is built like ``configs/tiny.py`` (``TransformerConfig.from_dict`` with global
  attention in every layer) with grouped-query attention (``num_kv_heads < num_heads``). The loss
  is next-token prediction as in ``train.py``: the input mask ``tokens > 0`` gives the causal
  attention mask (``make_causal_attn_mask``) and positions (``build_positions_from_mask``); the
  logits at position ``t`` predict ``tokens[t + 1]``, weighted by ``tokens[t + 1] > 0``.
  ``params`` is the ``nnx.State`` of the model's ``nnx.Param``s (``train.py``'s split).
  """
  from flax import nnx
  if not 0 < num_kv_heads < num_heads or num_heads % num_kv_heads:
    raise ValueError(f"load_gemma: num_kv_heads={num_kv_heads} must divide num_heads={num_heads} "
                     "and be smaller (grouped-query attention)")
  repo = _check_repo(repo)
  dest, commit = _extract(repo, "gemma", _GEMMA_FILES)
  mods = _import_from(dest, ("transformer_cfg", "transformer"))
  tcfg, tr = mods["transformer_cfg"], mods["transformer"]
  cfg = tcfg.TransformerConfig.from_dict(
      num_layers=num_layers, num_embed=vocab, embed_dim=embed_dim, hidden_dim=hidden_dim,
      num_heads=num_heads, head_dim=head_dim, num_kv_heads=num_kv_heads,
      use_post_attn_norm=False, use_post_ffw_norm=False, final_logit_softcap=None,
      attention_types=(tcfg.AttentionType.GLOBAL,) * num_layers)
  model = tr.Transformer(cfg, rngs=nnx.Rngs(params=seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, tokens):
    module = nnx.merge(graphdef, params, rest)
    input_mask = tokens > 0
    logits, _ = module(tokens, positions=tr.build_positions_from_mask(input_mask), cache=None,
                       attention_mask=tr.make_causal_attn_mask(input_mask))
    return _weighted_xent(logits[:, :-1], tokens[:, 1:], input_mask[:, 1:].astype(jnp.float32))

  return Example("gemma", model, cfg, params, loss, vocab,
                 dict(repo=repo, commit=commit, files=[f"examples/gemma/{f}" for f in _GEMMA_FILES]))
