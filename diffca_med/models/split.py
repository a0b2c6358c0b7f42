"""Stage 2: the common/salient split of the tokens, the adversary and its GRL weight.

Two split encoders map tokens Z (B, T, D) to ``(Ẑ_C, Ẑ_S)`` with Ẑ = Ẑ_C + Ẑ_S
(``ModelConfig.split_mode``); :class:`InpaintSplitEncoder` is described there.
``SplitEncoder`` (``additive``):

* a transformer over ``[CLS ; Z]``;
* the salient embedding s = Linear(h_CLS) (B, d), the low-dimensional summary;
* Ẑ_S is decoded from s alone (token-wise MLP of ``[s ; e_i]``), so s carries all
  of the salient factor;
* Ẑ_C = Z + Linear(h_i).
Both output layers start at zero, so an untrained split is the identity
(Ẑ_C = Z, Ẑ_S = 0) and a stage-1-only model reconstructs from Z unchanged.

The adversary predicts the image's set from Ẑ_C through a gradient-reversal layer;
:class:`GRLController` tunes the reversal weight so the adversary stays near chance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffca_med.models.config import ModelConfig


@dataclass
class SplitOutput:
    """common (B, T, D), salient (B, T, D), salient_embedding (B, d); for the
    in-painting split also the token gate (B, T) in [0, 1], the detector's
    per-token logits (B, K) and the in-painter's fill (B, T, D) for that gate, with
    its gradient (common and salient use it detached)."""

    common: torch.Tensor
    salient: torch.Tensor
    salient_embedding: torch.Tensor
    gate: torch.Tensor | None = None
    gate_logits: torch.Tensor | None = None
    fill: torch.Tensor | None = None


def _transformer(config: ModelConfig, depth: int) -> nn.TransformerEncoder:
    d = config.token_dim
    layer = nn.TransformerEncoderLayer(
        d, config.attention_heads, dim_feedforward=2 * d, dropout=0.0,
        activation="gelu", batch_first=True, norm_first=True,
    )
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class SplitEncoder(nn.Module):
    """E: tokens (B, T, D) → common (B, T, D), salient (B, T, D), embedding (B, d)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, t = config.token_dim, config.n_tokens
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, t + 1, d) * 0.02)
        self.transformer = _transformer(config, config.split_depth)
        self.norm = nn.LayerNorm(d)
        self.to_embedding = nn.Linear(d, config.salient_dim)
        self.token_keys = nn.Parameter(torch.randn(t, 16) * 0.5)
        self.salient_mlp = nn.Sequential(
            nn.Linear(config.salient_dim + 16, 2 * d), nn.SiLU(), nn.Linear(2 * d, d)
        )
        self.common_delta = nn.Linear(d, d)
        for lin in (self.salient_mlp[-1], self.common_delta):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def salient_from_embedding(self, s: torch.Tensor) -> torch.Tensor:
        """Salient tokens (B, T, D) decoded from embeddings s (B, d)."""
        b, t = s.shape[0], self.token_keys.shape[0]
        keys = self.token_keys.unsqueeze(0).expand(b, -1, -1)
        return self.salient_mlp(torch.cat([s.unsqueeze(1).expand(-1, t, -1), keys], dim=-1))

    def forward(self, tokens: torch.Tensor) -> SplitOutput:
        b = tokens.shape[0]
        h = torch.cat([self.cls.expand(b, -1, -1), tokens], dim=1) + self.pos
        h = self.norm(self.transformer(h))
        s = self.to_embedding(h[:, 0])
        common = tokens + self.common_delta(h[:, 1:])
        return SplitOutput(common=common, salient=self.salient_from_embedding(s), salient_embedding=s)


class InpaintSplitEncoder(nn.Module):
    """E for ``split_mode: inpaint``: the salient part is what a healthy prior cannot
    explain, token by token.

    The K semantic tokens form a (√K × √K) grid (token k describes image patch k when
    the conditioner uses ``query_window`` 0), the last token is the intensity token.

    * detector: per-token logits (B, K) from a shared MLP of [LayerNorm(z_k); p_k]
      (p_k a learnt position); trained from image labels only (multiple instance);
    * gate g (B, T) = sigmoid(logits) (at inference zeroed below ``gate_threshold``),
      grey-dilated ``gate_dilation`` times by the 4-neighbour cross to cover lesion
      borders; 0 on the intensity token;
    * in-painter: a transformer over tokens whose gated entries are replaced by a learnt
      mask token; trained on healthy images only (random square blocks masked, or the
      batch's tumour gates with ``inpaint_masks: gates``), so what it fills in is healthy
      tissue that fits the surroundings;
    * Ẑ_C = (1−g)·Z + g·fill, Ẑ_S = Z − Ẑ_C = g·(Z − fill): exactly additive;
    * salient embedding s (B, d): a CLS token attending to the salient tokens *without*
      positions (s describes what the lesion is more than where it is), projected to d;
      always from the soft gate it was trained on, also where Ẑ_S uses the thresholded one.

    An untrained encoder gates ≈ half of every token towards an untrained fill, so
    this mode needs stage 2 before use (stage-1-only models use ``additive``).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, k, t = config.token_dim, config.n_queries, config.n_tokens
        self.side, self.dilation = int(round(k ** 0.5)), config.gate_dilation
        self.threshold = config.gate_threshold
        self.detector_pos = nn.Parameter(torch.randn(k, d) * 0.02)
        self.detector = nn.Sequential(nn.Linear(2 * d, config.adversary_hidden), nn.SiLU(),
                                      nn.Linear(config.adversary_hidden, 1))
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.painter_pos = nn.Parameter(torch.randn(1, t, d) * 0.02)
        self.painter = _transformer(config, config.split_depth)
        self.painter_out = nn.Linear(d, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.summariser = _transformer(config, 1)
        self.norm = nn.LayerNorm(d)
        self.to_embedding = nn.Linear(d, config.salient_dim)
        self.summary_decoder = nn.Linear(config.salient_dim, d + 1)

    def gate_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token lesion logits (B, K) of the K semantic tokens."""
        k = self.detector_pos.shape[0]
        z = F.layer_norm(tokens[:, :k], tokens.shape[-1:])
        pos = self.detector_pos.expand(z.shape[0], -1, -1)
        return self.detector(torch.cat([z, pos], dim=-1)).squeeze(-1)

    def gate_from_logits(self, logits: torch.Tensor, sparse: bool | None = None) -> torch.Tensor:
        """(B, K) logits → gate (B, T) in [0, 1], dilated on the grid, 0 for intensity.

        ``sparse`` (default: not training): zero the values below ``gate_threshold``.
        """
        g = torch.sigmoid(logits)
        sparse = not self.training if sparse is None else sparse
        if sparse and self.threshold > 0:  # soft while training, sparse in use
            g = g * (g >= self.threshold)
        if self.dilation > 0:
            g = cross_dilate(g.view(-1, self.side, self.side), self.dilation).flatten(1)
        return torch.cat([g, g.new_zeros(g.shape[0], 1)], dim=1)

    def gate_masks(self, tumour_logits: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """In-painting masks (N, T) for N healthy images (``inpaint_masks: gates``): the
        thresholded, dilated gates of the tumour images' token logits (M, K), cycled over
        the N rows; a row whose gate is empty keeps its random block from ``blocks`` (N, T)."""
        gates = (self.gate_from_logits(tumour_logits, sparse=True) > 0).float()
        gates = gates[torch.arange(blocks.shape[0], device=blocks.device) % gates.shape[0]]
        empty = gates.sum(dim=1, keepdim=True) == 0
        return torch.where(empty, blocks, gates)

    def inpaint(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Healthy tokens (B, T, D) filling the masked entries of ``tokens`` (mask (B, T) in [0, 1])."""
        h = (1 - mask[..., None]) * tokens + mask[..., None] * self.mask_token
        return self.painter_out(self.painter(h + self.painter_pos))

    def embed(self, salient: torch.Tensor) -> torch.Tensor:
        """Salient embedding (B, d) from salient tokens (B, T, D)."""
        h = torch.cat([self.cls.expand(salient.shape[0], -1, -1), salient], dim=1)
        return self.to_embedding(self.norm(self.summariser(h)[:, 0]))

    def gated_salient(self, tokens: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g·(Z − fill), fill), both (B, T, D), for a gate (B, T), soft or thresholded. The
        salient part takes the fill detached, so the other stage-2 losses reach the gate, not
        the painter (a healthy prior; ``adversarial_fill`` lets the adversary and MMD terms
        reach it through the returned fill in :func:`split_losses`)."""
        fill = self.inpaint(tokens, gate.detach())
        return gate[..., None] * (tokens - fill.detach()), fill

    def forward(self, tokens: torch.Tensor) -> SplitOutput:
        logits = self.gate_logits(tokens)
        gate = self.gate_from_logits(logits)
        salient, fill = self.gated_salient(tokens, gate)
        # s is trained on soft gates; in use it still sees them, not the thresholded gate
        # that Ẑ_S takes (on the synthetic cohort's test slices: healthy/tumour probe on s
        # 0.725 from thresholded gates, 0.844 from soft ones; probe folds by slice)
        soft = salient if self.training or self.threshold <= 0 else \
            self.gated_salient(tokens, self.gate_from_logits(logits, sparse=False))[0]
        return SplitOutput(common=tokens - salient, salient=salient, salient_embedding=self.embed(soft),
                           gate=gate, gate_logits=logits, fill=fill)

    def salient_summary(self, salient: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """What s must encode (B, D+1): the gate-weighted mean salient token and the
        gated area log(1 + Σg) in tokens."""
        mass = gate.sum(dim=1, keepdim=True)
        mean = salient.sum(dim=1) / mass.clamp_min(1.0)
        return torch.cat([mean, torch.log1p(mass)], dim=1)


def image_logits(gate_logits: torch.Tensor) -> torch.Tensor:
    """Image-level lesion logits (B,) from per-token logits (B, K): their log-mean-exp
    (multiple-instance pooling: one confident token suffices, many weak ones add up)."""
    return torch.logsumexp(gate_logits, dim=1) - math.log(gate_logits.shape[1])


def cross_dilate(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Grey dilation of maps (B, H, W) by the 4-neighbour cross, ``steps`` times."""
    for _ in range(steps):
        p = F.pad(g, (1, 1, 1, 1))
        g = torch.stack([g, p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amax(dim=0)
    return g


def random_blocks(n: int, side: int, n_tokens: int, generator: torch.Generator | None,
                  device: torch.device) -> torch.Tensor:
    """Masks (n, n_tokens) of one random square block of 1–4 grid tokens per row."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    blocks = torch.zeros(n, side, side)
    sizes = torch.randint(1, min(4, side) + 1, (n,), generator=generator, device=gdev).cpu()
    corner = torch.rand(n, 2, generator=generator, device=gdev).cpu()
    for i in range(n):
        k = int(sizes[i])
        r, c = (corner[i] * (side - k + 1)).long().tolist()
        blocks[i, r:r + k, c:c + k] = 1
    mask = torch.cat([blocks.flatten(1), torch.zeros(n, n_tokens - side * side)], dim=1)
    return mask.to(device)


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.weight * grad, None


def grad_reverse(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-weight`` backward."""
    return _ReverseGrad.apply(x, float(weight))


def pool_tokens(tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, D) → (B, D) token mean (``mean``) or (B, T·D) (``flat``)."""
    return tokens.mean(dim=1) if pooling == "mean" else tokens.flatten(1)


class Adversary(nn.Module):
    """Set classifier on the common tokens: (B, T, D) → logits (B,) (1 = target).

    It sees the tokens pooled as ``config.adversary_pooling`` says (the token mean, the
    view the common-part probe uses, or all tokens flattened).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        h = config.adversary_hidden
        self.pooling = config.adversary_pooling
        n_in = config.token_dim if self.pooling == "mean" else config.n_tokens * config.token_dim
        # standardising the input (batch statistics) lets the adversary see low-variance
        # directions, as a standardised linear probe does
        self.net = nn.Sequential(
            nn.BatchNorm1d(n_in, affine=False),
            nn.Linear(n_in, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, 1),
        )

    def forward(self, common: torch.Tensor) -> torch.Tensor:
        return self.net(pool_tokens(common, self.pooling)).squeeze(1)


class GRLController(nn.Module):
    """Self-tuning gradient-reversal weight that keeps the adversary near chance.

    State lives in buffers (``weight``, ``acc_ema``, ``steps``) so it checkpoints with
    the model. After ``grl_warmup_steps`` updates, each update multiplies the weight by
    ``exp(gain · (acc_ema − target) / 0.1)``: an adversary that is right more often than
    chance gets a stronger reversal, one below chance a weaker one; clamped to
    ``[grl_min, grl_max]`` (a floor of 1e-3 keeps the multiplicative rule alive).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gain, self.target, self.ema = config.grl_gain, config.grl_target, config.grl_ema
        self.lo, self.hi = config.grl_min, config.grl_max
        self.warmup = config.grl_warmup_steps
        self.register_buffer("weight", torch.tensor(float(config.grl_init)))
        self.register_buffer("acc_ema", torch.tensor(float(config.grl_target)))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def update(self, accuracy: float) -> None:
        """Feed one batch accuracy of the adversary (0..1)."""
        self.acc_ema.mul_(self.ema).add_((1.0 - self.ema) * float(accuracy))
        self.steps.add_(1)
        if int(self.steps) <= self.warmup:
            return
        factor = math.exp(self.gain * (float(self.acc_ema) - self.target) / 0.1)
        new = max(float(self.weight), 1e-3) * factor
        self.weight.fill_(min(max(new, self.lo), self.hi))


def mean_gap(a: torch.Tensor, b: torch.Tensor, shrinkage: float = 0.1) -> torch.Tensor:
    """Mahalanobis distance² between the means of a (N, F) and b (M, F), divided by F.

    The covariance is the pooled within-set covariance of the batch, shrunk towards
    its mean variance (``shrinkage``) and detached. This is the separation a linear
    probe (LDA / logistic regression) exploits, including along low-variance,
    correlated directions that a per-feature or RBF comparison barely weighs.
    """
    if a.shape[0] < 2 or b.shape[0] < 2:
        return a.new_zeros(())
    f = a.shape[1]
    with torch.no_grad():
        centred = torch.cat([a - a.mean(0), b - b.mean(0)])
        cov = centred.T @ centred / max(1, centred.shape[0] - 2)
        ridge = cov.diagonal().mean().clamp_min(1e-6)
        cov = (1 - shrinkage) * cov + shrinkage * ridge * torch.eye(f, device=a.device, dtype=a.dtype)
        prec = torch.linalg.inv(cov)
    d = a.mean(0) - b.mean(0)
    return (d @ prec @ d) / f


def mmd_rbf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Biased RBF-kernel MMD² between samples a (N, F) and b (M, F), median bandwidth."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return a.new_zeros(())
    x = torch.cat([a, b], dim=0)
    d2 = torch.cdist(x, x).pow(2)
    bw = d2.detach().median().clamp_min(1e-6)
    k = torch.exp(-d2 / bw)
    n = a.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def weighted_loss(terms: dict[str, torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """Σ w_k · term_k with the stage-2 weights of ``config`` (terms absent count 0)."""
    weights = {"token_rec": config.w_token_rec, "bg_salient": config.w_bg_salient,
               "adv": config.w_adv, "denoise": config.w_denoise, "mmd": config.w_mmd,
               "salient_cls": config.w_salient_cls, "detect": config.w_detect,
               "inpaint": config.w_inpaint, "salient_rec": config.w_salient_rec}
    return sum(weights[k] * v for k, v in terms.items())


def split_losses(split: SplitEncoder | InpaintSplitEncoder, adversary: Adversary,
                 controller: GRLController, tokens: torch.Tensor, labels: torch.Tensor,
                 config: ModelConfig, salient_head: nn.Module | None = None,
                 update_controller: bool = True, generator: torch.Generator | None = None):
    """Token-level stage-2 losses (no denoiser term).

    ``tokens`` Z (B, T, D) from the frozen stage 1; ``labels`` (B,) 0 background /
    1 target. Returns (terms dict of scalar tensors with grad, SplitOutput, logs dict of
    floats). The adversary's own loss and the reversed gradient to E both come from
    the single ``adv`` term through :func:`grad_reverse`. The in-painting split adds
    ``detect`` (image logit = log-mean-exp of the token logits vs the label),
    ``inpaint`` (masked-token MSE on healthy images, random blocks from ``generator`` or
    :meth:`InpaintSplitEncoder.gate_masks`)
    and ``salient_rec`` (the salient summary decoded back from s); with
    ``config.adversarial_fill`` the ``adv`` and ``mmd`` terms see Ẑ_C with a live fill.
    """
    out = split(tokens)
    bg = labels == 0
    tg = labels == 1
    zhat = out.common + out.salient
    terms: dict[str, torch.Tensor] = {}
    terms["token_rec"] = F.mse_loss(zhat, tokens)
    if bg.any():
        terms["bg_salient"] = out.salient[bg].pow(2).mean()
    else:
        terms["bg_salient"] = zhat.new_zeros(())
    common, common_to_match = out.common, out.common
    if config.adversarial_fill and isinstance(split, InpaintSplitEncoder):
        # the same values with a live fill: the reversed gradient reaches the gate and
        # the in-painter, the MMD term only the in-painter (pulling the gate would
        # trade lesion detection for matched statistics)
        g, fill = out.gate[..., None], out.fill
        common = (1 - g) * tokens + g * fill
        common_to_match = (1 - g.detach()) * tokens + g.detach() * fill
    logits = adversary(grad_reverse(common, float(controller.weight)))
    terms["adv"] = F.binary_cross_entropy_with_logits(logits, labels.float())
    acc = ((logits.detach() > 0).long() == labels).float().mean()
    if config.w_mmd > 0:
        pool = config.adversary_pooling
        a, b = pool_tokens(common_to_match[tg], pool), pool_tokens(tokens[bg], pool)
        terms["mmd"] = mmd_rbf(a, b) + mean_gap(a, b)
    if config.w_salient_cls > 0 and salient_head is not None:
        terms["salient_cls"] = F.binary_cross_entropy_with_logits(
            salient_head(out.salient_embedding).squeeze(1), labels.float()
        )
    if isinstance(split, InpaintSplitEncoder):
        terms["detect"] = F.binary_cross_entropy_with_logits(image_logits(out.gate_logits), labels.float())
        if bg.any():
            zh = tokens[bg]
            mask = random_blocks(zh.shape[0], split.side, zh.shape[1], generator, zh.device)
            if config.inpaint_masks == "gates" and tg.any():
                mask = split.gate_masks(out.gate_logits[tg].detach(), mask)
            err = (split.inpaint(zh, mask) - zh).pow(2).mean(-1)
            terms["inpaint"] = (err * mask).sum() / mask.sum()
        summary = split.salient_summary(out.salient, out.gate).detach()
        terms["salient_rec"] = F.mse_loss(split.summary_decoder(out.salient_embedding), summary)
    if update_controller:
        controller.update(float(acc))
    logs = {"adv_acc": float(acc), "grl_weight": float(controller.weight),
            "adv_acc_ema": float(controller.acc_ema)}
    if out.gate is not None:
        logs["gate_tg"] = float(out.gate[tg].detach().mean()) if tg.any() else 0.0
        logs["gate_bg"] = float(out.gate[bg].detach().mean()) if bg.any() else 0.0
    return terms, out, logs
