"""Temporal layers: identity at initialisation, their own weights, and the prior's interface on videos."""

import torch

from pipelines.prior import Conditioning, Prior
from video.temporal import TemporalConfig, TemporalConv, inflate


def test_inflated_unet_equals_image_unet_per_frame_at_init(tiny_sd):
    """The default layers (the shipped recipe's: word states, per-clip kernels, drift) start as the identity."""
    prior = Prior.from_pretrained(str(tiny_sd))
    unet = prior.unet
    video_unet = inflate(unet)
    assert (video_unet.temporal.cfg.word_states, video_unet.temporal.cfg.shift_rank, video_unet.temporal.cfg.drift) == (
        True, 8, True)
    b, f = 2, 5
    x = torch.randn(b, 4, f, 8, 8)
    prompt = prior.encode_prompt(["a red cube", "a blue ball"], words=True)
    text = prompt.cond
    with torch.no_grad():
        video = video_unet(x, 500, text, fps=torch.tensor([4.0, 12.0]), words=prompt.cond_words).sample
        frames = torch.stack([unet(x[:, :, i], 500, encoder_hidden_states=text).sample for i in range(f)], dim=2)
    assert video.shape == (b, 4, f, 8, 8)
    torch.testing.assert_close(video, frames, atol=1e-5, rtol=1e-5)


def test_temporal_layers_are_active_once_trained(tiny_sd):
    """Not a no-op: perturbed temporal weights make frames depend on each other."""
    prior = Prior.from_pretrained(str(tiny_sd))
    video_unet = inflate(prior.unet)
    with torch.no_grad():
        for p in video_unet.temporal.parameters():
            p.add_(0.05 * torch.randn_like(p))
        prompt = prior.encode_prompt(["a red cube"], words=True)
        text, words = prompt.cond, prompt.cond_words
        x = torch.randn(1, 4, 3, 8, 8)
        out = video_unet(x, 10, text, words=words).sample
        x2 = x.clone()
        x2[:, :, 2] += 1.0  # change only the last frame
        out2 = video_unet(x2, 10, text, words=words).sample
    assert (out[:, :, 0] - out2[:, :, 0]).abs().max() > 1e-4  # frame 0 now sees frame 2


def test_temporal_weights_save_and_load_apart(tiny_sd, tmp_path):
    prior = Prior.from_pretrained(str(tiny_sd))
    video_unet = inflate(prior.unet)
    with torch.no_grad():
        for p in video_unet.temporal.parameters():
            p.add_(torch.randn_like(p))
    video_unet.temporal.save(tmp_path / "motion")
    spatial = set(prior.unet.state_dict())
    assert not spatial & set(video_unet.temporal.state_dict())
    again = inflate(Prior.from_pretrained(str(tiny_sd)).unet, weights=tmp_path / "motion")
    for k, v in video_unet.temporal.state_dict().items():
        torch.testing.assert_close(again.temporal.state_dict()[k], v)
    video_unet.freeze_spatial()
    trainable = {n for n, p in video_unet.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("temporal.") for n in trainable)


def test_prior_predicts_noise_for_videos_with_the_video_unet_as_its_denoiser(tiny_sd):
    """The video UNet is passed to the prior as the denoiser; the prior's own UNet stays the image UNet."""
    prior = Prior.from_pretrained(str(tiny_sd))
    unet = prior.unet
    text = prior.encode_prompt(["a red cube"], words=True)
    image_text = Conditioning(text.cond, text.uncond)  # the image UNet reads no word embeddings
    x = torch.randn(1, 4, 3, 8, 8)
    frames = torch.stack([prior.predict_noise(x[:, :, i], 300, image_text, guidance=5.0) for i in range(3)], dim=2)
    video_unet = inflate(prior.unet)
    torch.testing.assert_close(prior.predict_noise(x, 300, text, guidance=5.0, denoiser=video_unet), frames,
                               atol=1e-5, rtol=1e-5)
    assert prior.unet is unet


def test_pseudo_conv_is_dirac():
    conv = TemporalConv(6)
    x = torch.randn(2 * 4, 6, 3, 3)
    torch.testing.assert_close(conv(x, frames=4), x)


def test_long_clips_use_fused_windows():
    """Past the trained window, attention runs in half-overlapping windows fused by weight."""
    from video.temporal import TemporalAttention, TemporalConfig

    layer = TemporalAttention(8, TemporalConfig(text_dim=32, window=4))
    with torch.no_grad():
        layer.out.weight.normal_()
        tokens = torch.randn(9, 11, 8)  # (pixels, frames, channels)
        fused = layer._windowed(tokens)
        # a clip of exactly one window is plain attention; frame 0 lies only in the first window
        torch.testing.assert_close(layer._windowed(tokens[:, :4]), layer._attend(tokens[:, :4]))
        torch.testing.assert_close(fused[:, 0], layer._attend(tokens[:, :4])[:, 0])
        # frame 3 lies in windows [0, 4) and [2, 6): a weighted blend of both
        a, b = layer._attend(tokens[:, 0:4])[:, 3], layer._attend(tokens[:, 2:6])[:, 1]
        torch.testing.assert_close(fused[:, 3], (a * 1 + b * 2) / 3)
        y = layer(torch.randn(11 * 2, 8, 3, 3), frames=11)
        assert y.shape == (22, 8, 3, 3) and torch.isfinite(y).all()


def test_temporal_attention_knows_the_order_of_the_frames():
    """Self-attention alone is permutation-equivariant: reversed frames would give the reversed output. The
    frame positions added to the tokens make the order matter (zeroing them restores the symmetry)."""
    from video.temporal import TemporalAttention, TemporalConfig

    torch.manual_seed(0)
    layer = TemporalAttention(8, TemporalConfig(text_dim=32, window=8))
    with torch.no_grad():
        layer.out.weight.normal_()
        x = torch.randn(2 * 5, 8, 3, 3)  # (b f, c, h, w): 2 clips of 5 frames
        reverse = lambda y: y.reshape(2, 5, 8, 3, 3).flip(1).reshape(10, 8, 3, 3)  # noqa: E731
        out, out_of_reversed = layer(x, frames=5), layer(reverse(x), frames=5)
        assert (reverse(out_of_reversed) - out).abs().max() > 1e-2
        layer.positions.zero_()
        torch.testing.assert_close(reverse(layer(reverse(x), frames=5)), layer(x, frames=5))


def test_noise_rescheduling_reuses_first_window():
    from video.pipeline import reschedule_noise

    z = torch.randn(1, 4, 10, 2, 2)
    out = reschedule_noise(z, 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, :, :4], z[:, :, :4])
    firsts = {tuple(z[0, :, i].flatten().tolist()) for i in range(4)}
    assert all(tuple(out[0, :, i].flatten().tolist()) in firsts for i in range(4, 10))
    assert reschedule_noise(z, 16, torch.Generator()) is z


def test_known_frame_channels_start_unused_and_then_condition(tiny_sd):
    prior = Prior.from_pretrained(str(tiny_sd))
    video_unet = inflate(prior.unet, TemporalConfig(text_dim=prior.unet.config.cross_attention_dim, word_states=False))
    text = prior.encode_prompt(["a red cube"]).cond
    x, known = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 4, 3, 8, 8)
    mask = torch.zeros(1, 1, 3, 8, 8)
    mask[:, :, 0] = 1
    with torch.no_grad():
        plain = video_unet(x, 50, text).sample
        torch.testing.assert_close(video_unet(x, 50, text, known=known, mask=mask).sample, plain)
        video_unet.temporal.known_in.weight.normal_()
        conditioned = video_unet(x, 50, text, known=known, mask=mask).sample
        # CFG doubles x and text; the known frames follow
        doubled = video_unet(torch.cat([x, x]), 50, torch.cat([text, text]), known=known, mask=mask).sample
    assert (conditioned - plain).abs().max() > 1e-3
    torch.testing.assert_close(doubled[:1], conditioned, atol=1e-5, rtol=1e-5)


def test_word_states_reach_the_temporal_layers_through_predict_noise(tiny_sd):
    """Layers built with word_states read the encoder's first hidden states, which encode_prompt(words=True)
    returns and predict_noise passes on; without them the layers refuse, rather than guess."""
    from video.temporal import TemporalConfig

    prior = Prior.from_pretrained(str(tiny_sd))
    width = prior.unet.config.cross_attention_dim
    video_unet = inflate(prior.unet, TemporalConfig(text_dim=width, word_states=True))
    text = prior.encode_prompt(["a red cube"], words=True)
    swapped = prior.encode_prompt(["a red ball"], words=True)
    ids = prior.tokenize(["a red cube", "a red ball"])
    same = ids[0] == ids[1]
    moved = lambda a, b: (a - b).abs().amax(-1)[0] > 1e-6  # noqa: E731
    assert torch.equal(moved(text.cond_words, swapped.cond_words), ~same)  # word embeddings: no context
    assert (moved(text.cond, swapped.cond) & same).any()  # the last states mix the context in
    assert text.cond_words.shape == text.cond.shape and text.repeat(2).cond_words.shape[0] == 2
    x = torch.randn(1, 4, 3, 8, 8)
    with torch.no_grad():
        for p in video_unet.temporal.parameters():
            p.add_(0.05 * torch.randn_like(p))
        eps = prior.predict_noise(x, 300, text, guidance=5.0, denoiser=video_unet)
        other = Conditioning(text.cond, text.uncond, torch.randn_like(text.cond_words), text.uncond_words)
        assert (prior.predict_noise(x, 300, other, guidance=5.0, denoiser=video_unet) - eps).abs().max() > 1e-4
        try:
            prior.predict_noise(x, 300, prior.encode_prompt(["a red cube"]), guidance=5.0, denoiser=video_unet)
        except ValueError as e:
            assert "word embeddings" in str(e)
        else:
            raise AssertionError("layers with word_states ran without the word embeddings")


def test_prompt_chosen_shift_kernel_starts_at_zero_and_learns_from_the_first_step():
    """shift_rank > 0: each clip's depthwise kernel is the shared one plus a conditioned mix of basis kernels.
    It starts as the identity layer, gets a gradient at once, and computes each clip with its own kernel."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    b, f, c = 3, 4, 8
    x, cond = torch.randn(b * f, c, 5, 5), torch.randn(b, 16)
    chosen = TemporalConv(c, 3, cond_dim=16, shift_rank=2)
    torch.testing.assert_close(chosen(x, f, cond), x)  # identity at initialisation
    (chosen(x, f, cond) * torch.randn(b * f, c, 5, 5)).sum().backward()
    assert chosen.shift_basis.grad.abs().max() > 1e-3
    with torch.no_grad():  # per-clip kernels: the batched grouped convolution equals one clip at a time
        chosen.shift_basis.normal_()
        mixed = chosen._move(x.reshape(b, f, c, 5, 5).transpose(1, 2), cond)
        mix = chosen.shift_mix(cond)
        for i in range(b):
            kernel = chosen.shift.weight + torch.einsum("r,r...->...", mix[i], chosen.shift_basis)
            one = F.conv3d(x.reshape(b, f, c, 5, 5)[i].transpose(0, 1)[None], kernel, padding=(1, 1, 1), groups=c)
            torch.testing.assert_close(mixed[i], one[0], atol=1e-5, rtol=1e-5)


def test_drift_moves_each_frame_by_its_time_and_learns_from_the_first_step():
    """drift: frame j of clip i moves by tau(i, j) v(i), to first order. It starts as the identity, its
    velocity gets a gradient at once, and a velocity of one pixel per second moves a smooth pattern
    by tau pixels (against the exactly shifted pattern)."""
    torch.manual_seed(0)
    b, f, c, size = 2, 4, 3, 24
    cond = torch.randn(b, 16)
    tau = torch.tensor([[-1.5, -0.5, 0.5, 1.5], [-0.75, -0.25, 0.25, 0.75]]) / 8
    layer = TemporalConv(c, 3, cond_dim=16, drift=True)
    x = torch.randn(b * f, c, size, size)
    torch.testing.assert_close(layer(x, f, cond, tau), x)  # identity at initialisation
    try:
        layer(x, f, cond)
    except ValueError as e:
        assert "time" in str(e)
    else:
        raise AssertionError("a drifting layer ran without the frames' times")
    # frames before the centre want one thing, frames after it the opposite: the mean over time is zero
    want = torch.randn(b, 1, c, size, size) * torch.sign(tau)[..., None, None, None]
    (layer(x, f, cond, tau) * want.reshape(b * f, c, size, size)).sum().backward()
    assert layer.velocity.weight.grad.abs().max() > 1e-3

    # v = (+1 px/s along x, 0) for clip 0, (0, -2 px/s along y) for clip 1, on a smooth blob
    with torch.no_grad():
        layer.velocity.weight.zero_()
        layer.velocity.bias.zero_()
    grid = torch.arange(size, dtype=torch.float32) - size / 2
    blob = lambda dx, dy: torch.exp(-((grid[None, :] - dx) ** 2 + (grid[:, None] - dy) ** 2) / 18)
    x = blob(0, 0).expand(b * f, c, size, size)
    velocity = torch.tensor([[1.0, 0.0], [0.0, -2.0]])  # (b, (v_x, v_y)) px/s
    with torch.no_grad():  # the same velocity for every channel, read from the conditioning
        cond = torch.zeros(b, 16)
        cond[:, :2] = velocity
        layer.velocity.weight[:c, 0] = 1.0
        layer.velocity.weight[c:, 1] = 1.0
        moved = layer(x, f, cond, tau * 8).reshape(b, f, c, size, size)
    for i in range(b):
        for j in range(f):
            dx, dy = (tau[i, j] * 8 * velocity[i]).tolist()
            err = (moved[i, j, 0] - blob(dx, dy)).abs().max()
            unmoved = (x[0, 0] - blob(dx, dy)).abs().max()
            assert err < 0.5 * unmoved, (i, j, dx, dy, err, unmoved)  # first order: most of a move up to 1.5 px


def test_video_unet_gives_each_frame_its_time_from_the_centre(tiny_sd):
    """tau = (frame - (F - 1) / 2) / fps seconds, clamped to the config's time_range."""
    prior = Prior.from_pretrained(str(tiny_sd))
    width = prior.unet.config.cross_attention_dim
    video_unet = inflate(prior.unet, TemporalConfig(text_dim=width, word_states=False, time_range=0.5))
    seen = []
    layer = next(m for m in video_unet.temporal.layers.values() if isinstance(m, TemporalConv))
    layer.register_forward_hook(lambda m, args, out: seen.append(args[3]))
    text = prior.encode_prompt(["a red cube", "a blue ball"]).cond
    with torch.no_grad():
        video_unet(torch.randn(2, 4, 5, 8, 8), 500, text, fps=torch.tensor([4.0, 8.0]))
    expected = torch.tensor([[-0.5, -0.25, 0.0, 0.25, 0.5], [-0.25, -0.125, 0.0, 0.125, 0.25]])
    torch.testing.assert_close(seen[0], expected)
