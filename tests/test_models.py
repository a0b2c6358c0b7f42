"""Tests of the Diff-CA model (tiny sizes: 16×16, a few channels)."""

from __future__ import annotations

import json

import pytest
import torch

from diffca_med.errors import ConfigError, InputError
from diffca_med.models import DiffCAModel, ModelConfig
from diffca_med.models.sampling import ddim_invert, ddim_sample, ddim_timesteps
from diffca_med.models.split import (
    Adversary,
    GRLController,
    InpaintSplitEncoder,
    SplitEncoder,
    image_logits,
    split_losses,
    weighted_loss,
)

TINY = dict(
    image_size=16, scratch_channels=[8, 8], token_dim=16, n_queries=4, attention_heads=2,
    unet_channels=[8, 16], attention_levels=[False, True], adversary_hidden=16,
    intensity_bins=8, render_grid=4, sample_steps=4,
)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def images(b=4, seed=0, c=2, s=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, s, s, generator=g)
    x[:, :, :2] = 0.0  # a background border, as in skull-stripped slices
    return x


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ConfigError, match="n_querys"):
        ModelConfig.from_dict({"n_querys": 4})
    with pytest.raises(ConfigError, match="backbone"):
        ModelConfig.from_dict({"backbone": "resnet"})
    with pytest.raises(ConfigError, match="dinov3_path"):
        ModelConfig(backbone="dinov3")
    with pytest.raises(ConfigError, match="attention_levels"):
        tiny(attention_levels=[True])
    with pytest.raises(ConfigError, match="n_queries must be an integer"):
        ModelConfig.from_dict({"n_queries": "16"})
    with pytest.raises(ConfigError, match="attention_levels"):
        ModelConfig.from_dict({"attention_levels": [1, 0, 1]})
    with pytest.raises(ConfigError, match="must be a number"):
        ModelConfig.from_dict({"grl_gain": "fast"})
    with pytest.raises(ConfigError, match="intensity_statistics"):
        tiny(intensity_statistics="moments")
    assert ModelConfig.from_dict({"grl_gain": 1, "dinov3_path": None}).grl_gain == 1
    cfg = ModelConfig.from_dict(tiny().to_dict())
    assert cfg == tiny()


def test_pretrained_autoencoder_from_local_folder(tmp_path):
    from diffca_med.models.autoencoder import build_autoencoder

    cfg = tiny(space="latent", vae_channels=[8, 8], latent_channels=2)
    build_autoencoder(cfg).save_pretrained(tmp_path / "vae")
    model = DiffCAModel(tiny(space="latent", vae_channels=[8, 8], latent_channels=2,
                             pretrained_vae=str(tmp_path / "vae")))
    assert model.vae.config.latent_channels == 2
    with pytest.raises(ConfigError, match="latent"):
        DiffCAModel(tiny(space="latent", vae_channels=[8, 8], latent_channels=4,
                         pretrained_vae=str(tmp_path / "vae")))
    with pytest.raises(ConfigError, match="nowhere"):
        DiffCAModel(tiny(space="latent", pretrained_vae=str(tmp_path / "nowhere")))


def test_shapes_and_additive_split():
    torch.manual_seed(0)
    model = DiffCAModel(tiny()).eval()
    x = images()
    out = model.encode(x)
    T, D = model.config.n_tokens, model.config.token_dim
    assert out.tokens.shape == out.common.shape == out.salient.shape == (4, T, D)
    assert out.salient_embedding.shape == (4, model.config.salient_dim)
    assert torch.allclose(out.combined, out.common + out.salient)
    # an untrained split is the identity: Ẑ_C = Z, Ẑ_S = 0
    assert torch.allclose(out.common, out.tokens) and out.salient.abs().max() == 0
    y = model.reconstruct(x, steps=2)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert model.interpolate(x[:2], x[2:], [0.0, 0.5, 1.0], steps=2).shape == (3, 2, 2, 16, 16)
    assert model.swap(x[:2], x[2:], steps=2).shape == (2, 2, 16, 16)
    with pytest.raises(InputError, match="expected shape"):
        model.encode(torch.rand(2, 3, 16, 16))


def test_quantile_intensity_statistics_barely_see_a_small_lesion():
    """The intensity token's statistics of a slice and of the same slice with a bright
    2 x 2 lesion (2 % of the brain), relative to how much they differ between two
    healthy slices: the lesion moves the histogram more than another slice does (0.15
    vs 0.07), the quantiles less than half as much (0.05 vs 0.12)."""
    from diffca_med.models.conditioning import IntensityToken

    g = torch.Generator().manual_seed(0)
    brain = 0.3 + 0.2 * torch.rand(2, 2, 16, 16, generator=g)  # two healthy slices
    brain[:, :, :2] = 0.0
    lesion = brain[:1].clone()
    lesion[:, :, 8:10, 8:10] = 0.95

    def moves(kind: str) -> float:
        token = IntensityToken(tiny(intensity_statistics=kind, intensity_bins=8))
        (a, sa), (b, sb), (c, sc) = (token.statistics(x) for x in (brain[:1], lesion, brain[1:]))
        shift = lambda u, v, su, sv: float((u - v).abs().sum() + (su - sv).abs().sum())
        return shift(a, b, sa, sb) / shift(a, c, sa, sc)

    assert moves("quantiles") < 0.5 and moves("histogram") > 1.5, (moves("quantiles"), moves("histogram"))


@pytest.mark.parametrize("options", [
    dict(residual_diffusion=False),
    dict(residual_diffusion=False, render_prior=False, pooled_conditioning=False, query_locality=0.0),
    dict(prediction_type="epsilon"),
    dict(intensity_statistics="quantiles"),
])
def test_design_variants_train_and_sample(options):
    torch.manual_seed(0)
    model = DiffCAModel(tiny(**options))
    model.set_stage(1)
    model.stage_loss(1, images(), torch.zeros(4, dtype=torch.long))["loss"].backward()
    y = model.eval().reconstruct(images(), noise="inverted", steps=2)
    assert y.shape == (4, 2, 16, 16) and torch.isfinite(y).all()


def test_locality_bias_anchors_tile_the_patch_grid():
    from diffca_med.models.conditioning import locality_bias

    bias = locality_bias(16, 64, sigma=1.0)  # 4 x 4 anchors over 8 x 8 patches
    nearest = bias.argmax(dim=1)
    assert len(set(nearest.tolist())) == 16
    rows, cols = nearest // 8, nearest % 8
    assert set(rows.tolist()) == set(cols.tolist()) and len(set(rows.tolist())) == 4
    assert torch.equal(locality_bias(5, 10, 1.0), torch.zeros(5, 10))  # not a square grid


def test_query_window_makes_tokens_local():
    """query_window 0 without query self-attention and a channel-norm backbone: token k
    = patch k, so changing one corner of the image leaves the tokens of the opposite
    corner unchanged."""
    from diffca_med.models.conditioning import ConditioningEncoder, window_mask

    mask = window_mask(16, 16, 0)
    assert torch.equal((mask == 0).sum(dim=1), torch.ones(16, dtype=torch.long))
    assert (window_mask(16, 16, 1) == 0).sum() == 100  # 3 x 3 windows clipped at the border
    torch.manual_seed(0)
    cfg = tiny(image_size=32, n_queries=16, query_window=0, query_self_attention=False, backbone_norm="channel")
    enc = ConditioningEncoder(cfg).eval()
    x = images(2, s=32)
    y = x.clone()
    y[:, :, :6, :6] = 1.0  # top-left corner
    with torch.no_grad():
        a, b = enc(x)[:, :16], enc(y)[:, :16]
    changed = (a - b).abs().amax(dim=(0, 2)).view(4, 4) > 1e-5
    assert changed[0, 0] and not changed[3, 3] and not changed[2:, 2:].any()
    with torch.no_grad():  # with self-attention between queries, every token sees the change
        enc = ConditioningEncoder(tiny(image_size=32, n_queries=16, query_window=0, backbone_norm="channel")).eval()
        assert ((enc(x) - enc(y))[:, :16].abs().amax(dim=(0, 2)) > 1e-5).all()


def test_inpaint_split_toy_gates_only_the_lesion_tokens():
    """Tokens on a 4 x 4 grid: background = noise; targets add a fixed pattern to one
    random grid token. The in-painting split must gate that token, leave background
    images untouched (salient ≈ 0) and keep Ẑ_C + Ẑ_S = Z exactly."""
    torch.manual_seed(0)
    cfg = tiny(n_queries=16, split_mode="inpaint", gate_dilation=0, grl_warmup_steps=20, w_mmd=0.0)
    T, D = cfg.n_tokens, cfg.token_dim
    lesion = torch.randn(D) * 3.0

    def batch(n=32):
        labels = torch.arange(n) % 2
        z = torch.randn(n, T, D)
        where = torch.randint(0, 16, (n,))
        z[torch.arange(n), where] += labels.view(-1, 1) * lesion
        return z, labels, where

    split, adv, grl = InpaintSplitEncoder(cfg), Adversary(cfg), GRLController(cfg)
    opt = torch.optim.Adam(list(split.parameters()) + list(adv.parameters()), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        z, y, _ = batch()
        terms, _, logs = split_losses(split, adv, grl, z, y, cfg, generator=g)
        assert {"detect", "inpaint", "salient_rec", "adv"} <= set(terms) and "gate_tg" in logs
        opt.zero_grad()
        weighted_loss(terms, cfg).backward()
        opt.step()
    z, y, where = batch(256)
    with torch.no_grad():
        out = split(z)
    assert torch.allclose(out.common + out.salient, z, atol=1e-6)
    assert out.gate.shape == (256, T) and torch.all(out.gate[:, -1] == 0)  # never the intensity token
    tg = torch.nonzero(y == 1).squeeze(1)
    bg = out.salient[y == 0].pow(2).mean()
    assert bg < 0.05 * out.salient[tg].pow(2).mean(), float(bg)
    on_lesion = out.gate[tg, where[tg]].mean()
    elsewhere = (out.gate[tg, :16].sum(1) - out.gate[tg, where[tg]]).mean() / 15
    assert on_lesion > 0.8 and elsewhere < 0.1, (float(on_lesion), float(elsewhere))


def test_adversarial_fill_routes_the_set_losses_to_the_in_painter():
    """``adversarial_fill``: the adversary's reversed gradient reaches the in-painter
    (not only the gate), the MMD term reaches the in-painter but not the detector;
    the common tokens themselves are the same values either way."""
    torch.manual_seed(0)
    base = dict(n_queries=16, split_mode="inpaint", gate_dilation=0, w_mmd=1.0)
    split = InpaintSplitEncoder(tiny(**base))
    adv, grl = Adversary(tiny(**base)), GRLController(tiny(**base))
    z, y = torch.randn(8, 17, 16), torch.arange(8) % 2

    def grads(term: str, **kw) -> dict[str, float]:
        split.zero_grad()
        terms, out, _ = split_losses(split, adv, grl, z, y, tiny(**base, **kw), update_controller=False,
                                     generator=torch.Generator().manual_seed(0))
        terms[term].backward()
        norm = lambda ps: float(sum(p.grad.abs().sum() for p in ps if p.grad is not None))
        return {"painter": norm(split.painter_out.parameters()), "detector": norm(split.detector.parameters()),
                "common": out.common.detach()}

    off, on = grads("adv"), grads("adv", adversarial_fill=True)
    assert off["painter"] == 0 and on["painter"] > 0 and on["detector"] > 0
    assert torch.allclose(off["common"], on["common"])
    mmd_off, mmd_on = grads("mmd"), grads("mmd", adversarial_fill=True)
    assert mmd_off["painter"] == 0 and mmd_off["detector"] > 0
    assert mmd_on["painter"] > 0 and mmd_on["detector"] == 0


def test_gate_shaped_inpainting_masks_follow_the_tumour_gates():
    """``inpaint_masks: gates``: healthy images learn to fill the thresholded, dilated
    gates of the batch's tumour images (cycled); an empty gate keeps its random block."""
    split = InpaintSplitEncoder(tiny(n_queries=16, split_mode="inpaint", gate_dilation=1, gate_threshold=0.5))
    logits = torch.full((2, 16), -10.0)
    logits[0, 5] = 10.0  # tumour image 0: one confident token at row 1, column 1; image 1: none
    blocks = torch.zeros(3, 17)
    blocks[:, 0] = 1.0
    masks = split.gate_masks(logits, blocks)
    cross = torch.zeros(4, 4)
    cross[1, 1] = cross[0, 1] = cross[2, 1] = cross[1, 0] = cross[1, 2] = 1.0
    assert torch.equal(masks[0, :16], cross.flatten()) and torch.equal(masks[2], masks[0])
    assert torch.equal(masks[1], blocks[1]) and masks[:, 16].sum() == 0  # never the intensity token
    with pytest.raises(ConfigError, match="inpaint_masks"):
        tiny(inpaint_masks="circles")
    with pytest.raises(ConfigError, match="gate_threshold > 0"):
        tiny(n_queries=16, split_mode="inpaint", inpaint_masks="gates", gate_threshold=0.0)


def test_salient_support_is_the_image_cell_of_each_gated_token():
    torch.manual_seed(0)
    model = DiffCAModel(tiny(n_queries=16, split_mode="inpaint", gate_dilation=0, gate_threshold=0.5)).eval()
    logits = torch.full((2, 16), -10.0)
    logits[0, 5] = 10.0  # row 1, column 1 of the 4 x 4 token grid over the 16 x 16 image
    model.split.gate_logits = lambda tokens: logits
    support = model.salient_support(images(b=2))
    expected = torch.zeros(2, 16, 16, dtype=torch.bool)
    expected[0, 4:8, 4:8] = True
    assert support.dtype == torch.bool and torch.equal(support, expected)
    additive = DiffCAModel(tiny()).eval()  # untrained additive split: salient exactly 0
    assert not additive.salient_support(images(b=2)).any()


def test_paired_pseudo_healthy_keeps_the_input_where_the_split_changes_nothing():
    torch.manual_seed(0)
    model = DiffCAModel(tiny()).eval()  # untrained additive split: Ẑ_C = Ẑ
    x = images()
    assert torch.allclose(model.pseudo_healthy(x, steps=2, paired=True), x)
    assert not torch.allclose(model.pseudo_healthy(x, steps=2), x)


def test_stage_losses_and_freezing():
    torch.manual_seed(0)
    model = DiffCAModel(tiny())
    x, y = images(), torch.tensor([0, 1, 0, 1])
    model.set_stage(1)
    out = model.stage_loss(1, x, y)
    out["loss"].backward()
    assert {"loss", "diffusion", "render"} <= set(out)
    assert model.denoiser.unet.conv_in.weight.grad is not None
    assert model.split.cls.grad is None
    model.zero_grad(set_to_none=True)
    model.set_stage(2)
    assert not any(p.requires_grad for p in model.denoiser.parameters())
    assert not model.denoiser.training and model.split.training
    out = model.stage_loss(2, x, y)
    out["loss"].backward()
    for key in ("adv_acc", "grl_weight", "bg_salient", "token_rec"):
        assert key in out and out[key].ndim == 0
    assert model.denoiser.unet.conv_in.weight.grad is None
    assert model.adversary.net[1].weight.grad is not None
    assert int(model.grl.steps) == 1
    assert model.trainable_parameters(0) == []  # pixel space: no stage 0


def test_lesion_evidence_teaches_the_tokens_to_keep_a_small_lesion(tmp_path):
    """Stage 1 with ``lesion_evidence_weight``: a 2 x 2-pixel bright spot on a textured
    16² image (1.6 % of the slice) must become visible to the linear token probe, the
    probe is saved with the model, and a model without the option has no probe."""
    torch.manual_seed(0)
    model = DiffCAModel(tiny(lesion_evidence_weight=1.0))
    assert DiffCAModel(tiny()).lesion_probe is None

    def batch(n=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = 0.3 + 0.2 * torch.rand(n, 2, 16, 16, generator=g)
        y = torch.arange(n) % 2
        r, c = torch.randint(2, 14, (2, n), generator=g)
        for i in torch.nonzero(y).squeeze(1).tolist():
            x[i, :, r[i]:r[i] + 2, c[i]:c[i] + 2] = 0.95
        return x, y

    model.set_stage(1)
    opt = torch.optim.Adam(model.trainable_parameters(1), lr=3e-3)
    for step in range(150):
        out = model.stage_loss(1, *batch(seed=step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert "lesion" in out and model.lesion_probe.weight.grad is not None
    model.eval().requires_grad_(False)
    x, y = batch(64, seed=999)
    with torch.no_grad():
        logits = image_logits(model.lesion_probe(model.conditioner(x)[:, :4]).squeeze(-1))
    accuracy = ((logits > 0).long() == y).float().mean()
    assert accuracy >= 0.9, float(accuracy)
    model.save_pretrained(tmp_path / "m")
    loaded = DiffCAModel.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.lesion_probe.weight, model.lesion_probe.weight)
    with pytest.raises(ConfigError, match="lesion_evidence_weight"):
        tiny(lesion_evidence_weight=-1.0).validate()


def test_save_load_roundtrip_and_seed(tmp_path):
    torch.manual_seed(0)
    model = DiffCAModel(tiny())
    model.grl.weight.fill_(0.7)
    model.eval().requires_grad_(False)  # as from_pretrained returns it (same kernels)
    model.save_pretrained(tmp_path / "m")
    loaded = DiffCAModel.from_pretrained(tmp_path / "m")
    x = images()
    a = model.reconstruct(x, steps=3, seed=5)
    assert torch.equal(a, loaded.reconstruct(x, steps=3, seed=5))
    assert torch.equal(a, model.reconstruct(x, steps=3, seed=5))
    assert not torch.equal(a, model.reconstruct(x, steps=3, seed=6))
    assert float(loaded.grl.weight) == pytest.approx(0.7)
    assert torch.equal(model.encode(x).salient_embedding, loaded.encode(x).salient_embedding)
    assert not list(tmp_path.glob("*.tmp-*")) and not list((tmp_path / "m").glob("*.pt*"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{", encoding="utf-8")
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="config.json"):
        DiffCAModel.from_pretrained(tmp_path / "bad")
    old = json.loads((tmp_path / "m" / "config.json").read_text(encoding="utf-8"))
    old["format_version"] = 1  # written before the grid token renderer
    (tmp_path / "m" / "config.json").write_text(json.dumps(old), encoding="utf-8")
    with pytest.raises(InputError, match="older diffca-med.*retrain"):
        DiffCAModel.from_pretrained(tmp_path / "m")


def test_latent_space_stage0_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = DiffCAModel(tiny(space="latent", vae_channels=[8, 8], latent_channels=2))
    x = images()
    model.set_stage(0)
    out = model.stage_loss(0, x, torch.zeros(4, dtype=torch.long))
    out["loss"].backward()
    assert float(model.latent_scale) != 1.0
    model.set_stage(1)
    model.stage_loss(1, x, torch.zeros(4, dtype=torch.long))["loss"].backward()
    model.eval().requires_grad_(False)  # as from_pretrained returns it (same conv path)
    model.save_pretrained(tmp_path / "lat")
    loaded = DiffCAModel.from_pretrained(tmp_path / "lat")
    assert torch.equal(model.reconstruct(x, steps=2), loaded.reconstruct(x, steps=2))


def test_dinov3_backbone_from_local_folder(tmp_path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    vit_cfg = DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, patch_size=4, image_size=16,
                              num_register_tokens=1)
    DINOv3ViTModel(vit_cfg).save_pretrained(tmp_path / "dino")
    model = DiffCAModel(tiny(backbone="dinov3", dinov3_path=str(tmp_path / "dino"),
                             backbone_input_size=16))
    model.set_stage(1)
    vit = model.conditioner.backbone.vit
    before = next(vit.parameters()).clone()
    opt = torch.optim.AdamW(model.trainable_parameters(1), lr=1e-2)
    loss = model.stage_loss(1, images(), torch.zeros(4, dtype=torch.long))["loss"]
    loss.backward()
    opt.step()
    assert torch.equal(before, next(vit.parameters()))  # frozen
    assert all(id(p) not in {id(q) for q in vit.parameters()} for p in model.trainable_parameters(1))
    model.eval().requires_grad_(False).save_pretrained(tmp_path / "m")
    loaded = DiffCAModel.from_pretrained(tmp_path / "m")  # no need for the DINOv3 folder
    assert torch.equal(model.encode(images()).tokens, loaded.encode(images()).tokens)
    with pytest.raises(ConfigError, match="missing-dino"):
        DiffCAModel(tiny(backbone="dinov3", dinov3_path=str(tmp_path / "missing-dino")))


def test_ddim_timesteps_bounds_and_inversion_roundtrip():
    ts = ddim_timesteps(1000, 20)
    assert ts[0] == 999 and ts[-1] >= 0 and ts == sorted(ts, reverse=True) and len(ts) == 20
    assert ddim_timesteps(10, 50) == list(range(9, -1, -1))
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    x0 = torch.randn(2, 1, 4, 4)

    def oracle(x_t, t):  # ε-predictor that knows x0: inversion must be exact
        a = ac[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    xt, k = ddim_invert(oracle, x0, ac, "epsilon", steps=10, depth=0.5)
    assert k == 5
    back = ddim_sample(oracle, xt, ac, "epsilon", steps=10, start_index=k, clip=None)
    assert torch.allclose(back, x0, atol=1e-4)


def test_split_toy_background_salient_near_zero():
    """Tokens = common noise (+ a salient direction for targets only): the split must
    put nothing in the salient part of background samples, and something in targets."""
    torch.manual_seed(0)
    cfg = tiny(grl_warmup_steps=20)
    T, D = cfg.n_tokens, cfg.token_dim
    direction = torch.randn(T, D)
    direction = direction / direction.norm() * (T * D) ** 0.5  # unit RMS per element

    def batch(n=32):
        labels = torch.arange(n) % 2
        amp = 0.5 + torch.rand(n)
        z = torch.randn(n, T, D) + labels.view(-1, 1, 1) * amp.view(-1, 1, 1) * direction
        return z, labels

    split, adv, grl = SplitEncoder(cfg), Adversary(cfg), GRLController(cfg)
    opt = torch.optim.Adam(list(split.parameters()) + list(adv.parameters()), lr=3e-3)
    for _ in range(300):
        z, y = batch()
        terms, _, _ = split_losses(split, adv, grl, z, y, cfg)
        loss = weighted_loss(terms, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    z, y = batch(256)
    with torch.no_grad():
        out = split(z)
    bg = out.salient[y == 0].pow(2).mean()
    tg = out.salient[y == 1].pow(2).mean()
    assert bg < 0.05 * tg, (float(bg), float(tg))
    assert (out.common + out.salient - z).pow(2).mean() < 0.05  # the split still describes Z
    # the salient embedding separates the sets by a margin
    s = out.salient_embedding
    dist = (s - s[y == 0].mean(0)).norm(dim=1)
    assert dist[y == 1].min() > dist[y == 0].max() * 0.5 or dist[y == 1].mean() > 5 * dist[y == 0].mean()


def test_grl_controller_tracks_accuracy():
    ctrl = GRLController(tiny(grl_warmup_steps=0, grl_init=0.1, grl_ema=0.0))
    for _ in range(20):
        ctrl.update(0.9)
    assert float(ctrl.weight) > 0.1
    high = float(ctrl.weight)
    for _ in range(20):
        ctrl.update(0.2)
    assert float(ctrl.weight) < high
    assert {"weight", "acc_ema", "steps"} <= set(ctrl.state_dict())


@pytest.mark.slow
def test_inverted_noise_reconstructs_closer_than_fresh():
    torch.manual_seed(0)
    model = DiffCAModel(tiny())
    x = images(8, seed=3)
    model.set_stage(1)
    opt = torch.optim.AdamW(model.trainable_parameters(1), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss = model.stage_loss(1, x, torch.zeros(8, dtype=torch.long), generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    fresh = (model.reconstruct(x, noise="fresh", steps=10) - x).pow(2).mean()
    inv = (model.reconstruct(x, noise="inverted", steps=10) - x).pow(2).mean()
    assert inv < fresh, (float(inv), float(fresh))


def test_model_config_records_the_store_normalisation():
    """A model knows the normalisation it was trained on; configs saved before the field
    existed mean the old 0.5/99.5 window, and a store normalised otherwise is refused."""
    from types import SimpleNamespace

    from diffca_med.analysis.counterfactuals import check_store_fits

    legacy = ModelConfig.from_dict(dict(TINY))
    assert legacy.intensity_percentiles == [0.5, 99.5] and legacy.intensity_upper_value == 1.0
    current = ModelConfig.from_dict({**TINY, "intensity_percentiles": [0.5, 50.0], "intensity_upper_value": 0.3})
    store = SimpleNamespace(size=16, normalisation=((0.5, 50.0), 0.3), path="STORE")
    check_store_fits(store, SimpleNamespace(config=current))
    with pytest.raises(InputError, match="STORE: intensities map brain percentiles 0.5/50 to 0/0.3"):
        check_store_fits(store, SimpleNamespace(config=legacy))
