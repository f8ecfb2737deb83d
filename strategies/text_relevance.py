"""Text relevance of each visual token to the instruction's keywords (Eq. 13)."""

from __future__ import annotations

from dataclasses import dataclass, field

import regex
import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.errors import InvalidInputError
from resprune.interfaces import Scorer
from resprune.linalg import unit_rows
from resprune.params import check_choice
from resprune.text import ANSWER_FORMAT_PATTERNS, KEYWORD_MODES, extract_keywords, strip_format

REDUCTIONS = ("max", "mean", "pooled")


class TextRelevance(Scorer):
    """``r_i = max_j max(0, cos(v_i, u_j))`` over keyword sub-word embeddings ``u_j``.

    The instruction is stripped of answer-format phrases (``strip``), reduced to keywords
    (``keywords``), and every sub-word embedding of every keyword (from the context's
    ``text_embedder``, the LLM's input-embedding table) is one ``u_j``. ``reduce`` picks
    the paper's Table VI variant: ``max`` (Eq. 13), ``mean`` over keywords, or ``pooled``
    (cosine to the mean keyword embedding). No keyword left gives ``r_i = 1``.
    """

    name = "text_relevance"
    output = "relevance"
    description = "cosine relevance of tokens to the instruction's keywords"
    requires = frozenset({"text", "text_embedder"})

    @dataclass
    class Params:
        reduce: str = "max"
        """`max` (Eq. 13), `mean` over keyword embeddings, or `pooled` (cosine to the mean
        keyword embedding): the paper's Table VI variants."""
        keywords: str = "content"
        """`content` (built-in stop-word filter), `nouns` (spaCy `en_core_web_sm`: needs
        `pip install "resprune[nouns]"` and the model) or `all` (every word)."""
        strip: list[str] = field(default_factory=lambda: list(ANSWER_FORMAT_PATTERNS))
        """Regular expressions removed (case-insensitively) from the instruction first; the
        defaults (`resprune.text.ANSWER_FORMAT_PATTERNS`) cover the answer-format instructions of
        the common LVLM benchmarks and `<image>`. `[]` disables stripping."""

        def __post_init__(self) -> None:
            check_choice("reduce", self.reduce, REDUCTIONS)
            check_choice("keywords", self.keywords, KEYWORD_MODES)
            for i, pattern in enumerate(self.strip):
                try:
                    regex.compile(pattern)
                except regex.error as exc:
                    raise ValueError(f"strip[{i}]={pattern!r} is not a regular expression: {exc}") from None

    def keywords(self, text: str) -> list[str]:
        """The keywords this scorer embeds for ``text``."""
        return extract_keywords(strip_format(text, self.params.strip), self.params.keywords)

    def score(self, context: PruneContext) -> Tensor:
        texts = context.texts(requester=f"scorer '{self.name}'")
        embed = context.get("text_embedder", requester=f"scorer '{self.name}'")
        tokens = context.tokens
        b, n, d = tokens.shape
        words: dict[str, Tensor] = {}  # each word embedded once per call, each text reduced once
        per_text: dict[str, Tensor] = {}
        for text in dict.fromkeys(texts):
            kws = self.keywords(text)
            for w in kws:
                if w not in words:
                    words[w] = self._embed(embed, w, tokens)
            u = torch.cat([words[w] for w in kws]).float() if kws else tokens.new_zeros(0, d)
            if self.params.reduce == "pooled" and u.shape[0]:
                u = u.mean(dim=0, keepdim=True)
            per_text[text] = unit_rows(u)
        keys = [per_text[text] for text in texts]  # unit keyword embeddings per image, [L_b, d]
        longest = max(u.shape[0] for u in keys)
        if longest == 0:
            return torch.ones(b, n, device=tokens.device)
        # one batched product for all images: cos = (v . u_hat) / ||v||, without a normalised copy of V
        padded = torch.nn.utils.rnn.pad_sequence(keys, batch_first=True)  # [B, L, d], zero rows beyond L_b
        lengths = torch.tensor([u.shape[0] for u in keys], device=tokens.device)
        valid = torch.arange(longest, device=tokens.device) < lengths.unsqueeze(1)  # [B, L]
        norms = tokens.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(tokens.dtype).tiny)  # [B, N, 1]
        cos = (torch.bmm(tokens, padded.transpose(1, 2)) / norms).clamp_min_(0)  # [B, N, L]
        mask = valid.unsqueeze(1)
        if self.params.reduce == "mean":
            out = cos.masked_fill(~mask, 0).sum(-1) / valid.sum(-1, keepdim=True).clamp_min(1)
        else:
            out = cos.masked_fill(~mask, float("-inf")).max(dim=-1).values
        has_keys = valid.any(dim=-1, keepdim=True)
        return torch.where(has_keys, out, torch.ones_like(out))

    def _embed(self, embed, word: str, tokens: Tensor) -> Tensor:
        u = embed(word)
        if not isinstance(u, Tensor) or u.dim() != 2 or u.shape[-1] != tokens.shape[-1]:
            shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise InvalidInputError(
                f"text_embedder({word!r}) returned {shape}; expected [L, d] with d={tokens.shape[-1]} "
                f"(the visual tokens' width).")
        return u.to(tokens.device)


@hookimpl
def resprune_register_scorers(register):
    register(TextRelevance)
