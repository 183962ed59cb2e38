"""Trie-constrained decoding of a Hugging Face causal LM over an item catalog.

Four ways to get items out of a model, all batched over prompts (left padding with an attention
mask, ``batch_size`` prompts at a time, a tqdm progress bar), all returning catalog items only,
and all optionally flow-guided (``guidance=``, :mod:`.guidance`):

- :meth:`TrieDecoder.beam_search` (:mod:`.beam`): the evaluation protocol (10 beams, the 10
  finished beams are the top-10 list, length penalty 1). It reproduces transformers' beam search
  exactly (same candidates, same finished-beam bookkeeping, same early-stopping heuristic, EOS
  scored and counted in the length), so its lists are those of ``model.generate(num_beams=10,
  ...)`` with a trie constraint, but it runs its own loop over the KV cache: each prompt is
  prefilled once instead of once per beam, only the trie's children of each beam are
  candidates, and prompts whose beams are settled leave the batch.
- :meth:`TrieDecoder.sample` (:mod:`.sampling`): ancestral sampling with the logits masked to
  the trie (the distribution a rollout draws from), any temperature, several samples per prompt.
- :meth:`TrieDecoder.sampled_top_k` (:mod:`.sampling`): K distinct items without replacement,
  in proportion to the model's trie-constrained distribution: stochastic beam search (Kool, van
  Hoof and Welling, ICML 2019) over the trie with the KV cache, i.e. Gumbel-top-k over the items
  without scoring them all. It costs what a K-beam search costs (about K x depth token steps per
  prompt), so it scales to a 4k-item catalog and batches of users, where Gumbel-top-k over exact
  item log-probabilities would score the whole trie (30k nodes for Video_Games) for every user.
- :meth:`TrieDecoder.exact_item_log_probs` (:mod:`.exact`): the log-probability of every item
  for each prompt, each trie node's logits computed once (tree attention over the trie).

Two distributions over items appear here. The *trie-constrained* one renormalises the model's
next-token distribution over each node's children (``normalize="trie"``): it is what constrained
sampling, rollouts and :meth:`~TrieDecoder.sampled_top_k` draw from, and it sums to 1 over the
distinct item sequences. Beam search instead ranks by the model's own full-vocabulary
log-probabilities (the mask removes tokens, it does not renormalise), plus the EOS token that
ends the generation, divided by the generated length: :meth:`~TrieDecoder.exact_beam_scores`
computes that score for every item, so the exact top-K of the beam objective is a sort away.

Items with identical token sequences (``ItemTokens.collisions``, in practice duplicate titles)
share one trie leaf: decoding outputs the first item of such a group, and the exact methods give
every item of the group the sequence's value (sum over ``Catalog.canonical`` items to get 1).

The modules split the work by job: :mod:`.catalog` (titles, sequences, trie), :mod:`.runner`
(prompt batches, the KV cache, forwards), :mod:`.beam`, :mod:`.sampling`, :mod:`.exact`,
:mod:`.guidance`, and :mod:`.decoder`, which puts them together as :class:`TrieDecoder`.
"""

from .catalog import Catalog
from .decoder import TrieDecoder, beam_search, exact_item_log_probs, sample, sampled_top_k
from .guidance import GUIDANCE_FORMS, Guidance, guided_beam_scores

__all__ = [
    "GUIDANCE_FORMS",
    "Catalog",
    "Guidance",
    "TrieDecoder",
    "beam_search",
    "exact_item_log_probs",
    "guided_beam_scores",
    "sample",
    "sampled_top_k",
]
