"""The CLIP4STR model: sizes, masks, EOS/PAD handling, gradient block, decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.config import model_config
from training.model.clip4str import CLIP4STR
from training.model.decoder import autoregressive, causal_mask, cloze_mask, padding_bias, permutation_logits, refine
from training.model.permutations import attention_masks, generate_permutations

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny() -> CLIP4STR:
    torch.manual_seed(0)
    return CLIP4STR(model_config("clip4str-tiny")).eval()


def _counts(model: torch.nn.Module) -> tuple[float, float]:
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return total / 1e6, frozen / 1e6


@pytest.mark.parametrize(("name", "paper_total", "paper_frozen"),
                         [("clip4str-b16", 158.0, 44.3), ("clip4str-l14", 446.0, 80.5)])
def test_parameter_counts_match_the_paper(name: str, paper_total: float, paper_frozen: float) -> None:
    total, frozen = _counts(CLIP4STR(model_config(name)))
    print(f"{name}: {total:.2f}M parameters, {frozen:.2f}M frozen (paper: {paper_total}M / {paper_frozen}M)")
    assert abs(total - paper_total) / paper_total < 0.01
    assert abs(frozen - paper_frozen) / paper_frozen < 0.01


def test_image_features_keep_cls_and_patch_tokens(tiny: CLIP4STR) -> None:
    features = tiny.encode_image(torch.randn(2, 3, 32, 128))
    assert features.shape == (2, 1 + (32 // 4) * (128 // 8), tiny.cfg.embed_dim)
    text = tiny.encode_text(torch.zeros(2, 16, dtype=torch.long))
    assert text.shape == (2, 16, tiny.cfg.embed_dim)


def test_text_tower_freezes_embeddings_and_lower_half(tiny: CLIP4STR) -> None:
    text = tiny.text_encoder
    blocks = text.transformer.resblocks
    assert not text.token_embedding.weight.requires_grad and not text.positional_embedding.requires_grad
    half = len(blocks) // 2
    assert all(not p.requires_grad for b in blocks[:half] for p in b.parameters())
    assert all(p.requires_grad for b in blocks[half:] for p in b.parameters())


def test_permutations_are_canonical_then_mirrored_pairs() -> None:
    perms = generate_permutations(5, 6, np.random.default_rng(0))
    assert perms.shape == (6, 7)
    assert perms[0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert perms[1].tolist() == [0, 6, 5, 4, 3, 2, 1]
    for i in (2, 4):
        assert perms[i + 1, 1:-1].tolist() == perms[i, 1:-1].flip(0).tolist()
    for p in perms:
        assert sorted(p.tolist()) == list(range(7)) and p[0] == 0
    assert len(generate_permutations(2, 6, np.random.default_rng(0))) == 2
    assert len(generate_permutations(1, 6, np.random.default_rng(0))) == 1


def test_attention_masks_of_a_permutation() -> None:
    # order: BOS, c2, c1, EOS -> c2 is predicted first, then c1 (which may see c2), then EOS
    content, query = attention_masks(torch.tensor([0, 2, 1, 3]))
    visible = (query == 0).int().tolist()
    # rows: outputs c1, c2, EOS; columns: content BOS, c1, c2
    assert visible == [[1, 0, 1], [1, 0, 0], [1, 1, 1]]
    assert (content == 0).int().tolist() == [[1, 0, 0], [1, 1, 1], [1, 0, 1]]
    ltr_content, ltr_query = attention_masks(torch.arange(5))
    assert torch.equal(ltr_query, causal_mask(4))
    assert torch.equal(ltr_content, causal_mask(4))


def test_cloze_mask_hides_only_the_own_token(tiny: CLIP4STR) -> None:
    decoder = tiny.visual_decoder
    memory = tiny.encode_image(torch.randn(1, 3, 32, 128))
    tokens = torch.tensor([[tiny.codec.bos_id, 5, 6, 7, 8]])
    queries = decoder.pos_queries[:, :5]
    base = decoder(tokens, memory, query=queries, query_mask=cloze_mask(5))
    for pos in range(1, 5):
        changed = tokens.clone()
        changed[0, pos] = 30
        out = decoder(changed, memory, query=queries, query_mask=cloze_mask(5))
        same = torch.isclose(out, base, atol=1e-5).all(-1)[0]
        # the output predicting token `pos` (query pos - 1) must not see it; all others do
        assert same[pos - 1] and not same[[q for q in range(5) if q != pos - 1]].any()


def _reference_greedy(decoder, memory, bos: int, steps: int) -> torch.Tensor:
    """Step-by-step reference: re-run the full causal decode for each prefix."""
    tokens = torch.full((memory.shape[0], 1), bos, dtype=torch.long)
    rows = []
    for i in range(steps):
        out = decoder(tokens, memory, query_mask=causal_mask(i + 1))
        rows.append(out[:, -1:])
        tokens = torch.cat([tokens, out[:, -1].argmax(-1, keepdim=True)], dim=1)
    return torch.cat(rows, dim=1)


def test_autoregressive_decode_matches_step_by_step_reference(tiny: CLIP4STR) -> None:
    with torch.no_grad():
        memory = tiny.encode_image(torch.randn(3, 3, 32, 128))
        fast = autoregressive(tiny.visual_decoder, memory, tiny.codec.bos_id, 26, early_exit=False)
        reference = _reference_greedy(tiny.visual_decoder, memory, tiny.codec.bos_id, 26)
    assert torch.allclose(fast, reference, atol=1e-4)


def test_early_exit_gives_the_same_words(tiny: CLIP4STR) -> None:
    images = torch.randn(4, 3, 32, 128)
    with torch.no_grad():
        a = tiny(images, early_exit=True)["final"].argmax(-1).numpy()
        b = tiny(images, early_exit=False)["final"].argmax(-1).numpy()
    assert tiny.codec.ids_to_text(a) == tiny.codec.ids_to_text(b)


def test_refine_masks_tokens_after_first_eos(tiny: CLIP4STR) -> None:
    memory = tiny.encode_image(torch.randn(1, 3, 32, 128))
    logits = torch.full((1, 6, tiny.codec.num_classes), -5.0)
    for step, cls in enumerate([3, 4, 0, 7, 8, 9]):
        logits[0, step, cls] = 5.0
    other = logits.clone()
    other[0, 3:, :] = torch.flip(other[0, 3:, :], dims=[-1])  # change tokens after EOS
    with torch.no_grad():
        a = refine(tiny.visual_decoder, memory, logits, tiny.codec.bos_id)
        b = refine(tiny.visual_decoder, memory, other, tiny.codec.bos_id)
    assert torch.allclose(a, b, atol=1e-5)


def test_cross_branch_gradients_never_reach_the_image_encoder() -> None:
    torch.manual_seed(0)
    model = CLIP4STR(model_config("clip4str-tiny")).train()
    parts = model.losses(torch.randn(2, 3, 32, 128), ["ab1", "xyz"], np.random.default_rng(0))
    parts["cross"].backward()
    assert all(p.grad is None or not p.grad.any() for p in model.image_encoder.parameters())
    assert all(p.grad is None or not p.grad.any() for p in model.visual_decoder.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.cross_decoder.parameters())
    upper = model.text_encoder.transformer.resblocks[-1]
    assert any(p.grad is not None and p.grad.any() for p in upper.parameters())
    model.zero_grad()
    parts = model.losses(torch.randn(2, 3, 32, 128), ["ab1", "xyz"], np.random.default_rng(0))
    parts["visual"].backward()
    assert any(p.grad is not None and p.grad.any() for p in model.image_encoder.parameters())


def test_batched_permutations_equal_one_pass_per_permutation() -> None:
    torch.manual_seed(0)
    cfg = model_config("clip4str-tiny")
    cfg.decoder.depth = 2  # the content stream is updated too
    model = CLIP4STR(cfg).eval()
    codec = model.codec
    targets = torch.from_numpy(codec.encode(["hello", "ab", "xyz12"]))
    context = targets[:, :-1]
    padding = padding_bias((context == codec.pad_id) | (context == codec.eos_id))
    memory = torch.randn(3, 20, cfg.embed_dim)
    masks = [attention_masks(p) for p in generate_permutations(5, 6, np.random.default_rng(0))]
    batched = permutation_logits(model.visual_decoder, context, memory, torch.stack([m[1] for m in masks]),
                                 torch.stack([m[0] for m in masks]), padding)
    for k, (content_mask, query_mask) in enumerate(masks):
        single = model.visual_decoder(context, memory, query_mask=query_mask, content_mask=content_mask,
                                      padding_mask=padding)
        assert torch.allclose(single, batched[k], atol=1e-5)


def test_loss_ignores_pad_and_scores_eos_only_in_canonical_orders(tiny: CLIP4STR, monkeypatch) -> None:
    import training.model.clip4str as clip4str_module

    codec = tiny.codec
    ce = torch.nn.functional.cross_entropy

    def run(labels: list[str], num_chars: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        targets = torch.from_numpy(codec.encode(labels))
        context, expected = targets[:, :-1], targets[:, 1:]
        perms = generate_permutations(num_chars, 6, np.random.default_rng(0))
        logits = torch.randn(len(perms), len(labels), expected.shape[1], codec.num_classes)
        monkeypatch.setattr(clip4str_module, "permutation_logits", lambda *args: logits)
        loss, _ = tiny._perm_loss(tiny.visual_decoder, torch.zeros(2, 1, 8), context, expected, perms, None)
        return loss, logits, expected, len(perms)

    loss, logits, expected, k = run(["ab", "c"], 2)
    assert k == 2
    keep = expected.flatten() != codec.pad_id
    reference = sum(ce(logits[i].flatten(0, 1)[keep], expected.flatten()[keep], reduction="sum") for i in range(2))
    assert torch.isclose(loss, reference / (2 * keep.sum()))
    # with 3+ characters there are later orders: EOS must not be a target there
    loss, logits, expected, k = run(["abc", "de"], 3)
    tgt = expected.flatten()
    with_eos = tgt != codec.pad_id
    no_eos = with_eos & (tgt != codec.eos_id)
    total = sum(ce(logits[i].flatten(0, 1)[with_eos], tgt[with_eos], reduction="sum") for i in range(2))
    total += sum(ce(logits[i].flatten(0, 1)[no_eos], tgt[no_eos], reduction="sum") for i in range(2, k))
    assert torch.isclose(loss, total / (2 * with_eos.sum() + (k - 2) * no_eos.sum()))


def test_fast_variant_and_refinement_count(tiny: CLIP4STR) -> None:
    images = torch.randn(2, 3, 32, 128)
    tiny.cfg.fast_decode = True
    try:
        out = tiny(images)
    finally:
        tiny.cfg.fast_decode = False
    assert "cross_ar" not in out and out["final"].shape == (2, 26, tiny.codec.num_classes)
    tiny.cfg.refine_iters = 0
    try:
        out = tiny(images)
    finally:
        tiny.cfg.refine_iters = 1
    assert torch.equal(out["final"], out["cross_ar"])


def test_non_autoregressive_first_prediction(tiny: CLIP4STR) -> None:
    """The parallel pass: one decoder pass, every position seeing only BOS; its first
    position equals the AR decode's first step, and the whole decode still refines."""
    from training.model.decoder import autoregressive, parallel

    memory = tiny.encode_image(torch.randn(2, 3, 32, 128))
    bos, steps = tiny.codec.bos_id, tiny.cfg.num_steps
    with torch.no_grad():
        nar = parallel(tiny.visual_decoder, memory, bos, steps)
        ar = autoregressive(tiny.visual_decoder, memory, bos, steps, early_exit=False)
        assert nar.shape == ar.shape
        assert torch.allclose(nar[:, 0], ar[:, 0], atol=1e-5)
        assert not torch.allclose(nar[:, 1:], ar[:, 1:])
        tiny.cfg.autoregressive = False
        try:
            out = tiny(torch.randn(2, 3, 32, 128))
        finally:
            tiny.cfg.autoregressive = True
    assert out["final"].shape == (2, steps, tiny.codec.num_classes) and "cross_refined" in out


def test_loss_falls_over_a_few_steps() -> None:
    torch.manual_seed(0)
    model = CLIP4STR(model_config("clip4str-tiny")).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images, labels = torch.randn(4, 3, 32, 128), ["cat", "Dog", "42", "a-b"]
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(8):
        loss, _ = model.loss(images, labels, rng)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
