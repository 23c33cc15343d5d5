"""Attention rollout on attention patterns whose answer is known by hand."""

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from model.rollout import attention_rollout, overlay_heatmap

GRID = 2  # 2 x 2 patches
N = 1 + GRID * GRID  # [CLS, p0, p1, p2, p3]


def _one_hot_attention(column: int, batch: int = 1, heads: int = 2, num_tokens: int = N) -> torch.Tensor:
    """Every row of every head puts all attention on token `column`: (B, heads, N, N)."""
    attn = torch.zeros(batch, heads, num_tokens, num_tokens)
    attn[..., column] = 1.0
    return attn


def _random_attention(batch: int, layers: int = 3, heads: int = 4, num_tokens: int = N, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, num_tokens, num_tokens, generator=gen).mul(3).softmax(-1) for _ in range(layers)]


def test_identity_attention_gives_uniform_map():
    attn = [torch.eye(N).expand(2, 3, N, N) for _ in range(4)]
    maps = attention_rollout(attn)
    assert maps.shape == (2, GRID, GRID)
    # Nothing flows from the patches to CLS: every patch scores the same (constant map -> zeros).
    assert torch.equal(maps, torch.zeros(2, GRID, GRID))


def test_all_attention_on_one_patch_peaks_there():
    k = 3  # token 3 = patch 2 = grid cell (1, 0)
    maps = attention_rollout([_one_hot_attention(k) for _ in range(3)])
    expected = torch.zeros(1, GRID, GRID)
    expected[0, 1, 0] = 1.0
    assert torch.equal(maps, expected)


def test_layers_multiply_and_start_layer_skips_layers():
    # Layer 0: all attention on token 1 (cell (0,0)); layer 1: all on token 4 (cell (1,1)).
    # With the identity mix A_l = (one_hot + I) / 2, the CLS row of A_1 @ A_0 is
    # 0.5 e1 + 0.25 e4 + 0.25 e0, so after min-max over patches: cell (0,0) = 1, cell (1,1) = 0.5.
    attn = [_one_hot_attention(1), _one_hot_attention(4)]
    torch.testing.assert_close(attention_rollout(attn), torch.tensor([[[1.0, 0.0], [0.0, 0.5]]]))
    torch.testing.assert_close(attention_rollout(attn, start_layer=1), torch.tensor([[[0.0, 0.0], [0.0, 1.0]]]))


def test_head_fusions_hand_computed():
    # One layer: the map is the min-max normalised fused CLS row over patch columns.
    attn = torch.eye(N).repeat(1, 2, 1, 1)  # (1, 2, N, N)
    attn[0, 0, 0] = torch.tensor([0.2, 0.6, 0.2, 0.0, 0.0])
    attn[0, 1, 0] = torch.tensor([0.1, 0.0, 0.3, 0.5, 0.1])
    # mean patches [.3, .25, .25, .05]; max [.6, .3, .5, .1]; min [0, .2, 0, 0]
    expected = {
        "mean": [[1.0, 0.8], [0.8, 0.0]],
        "max": [[1.0, 0.4], [0.8, 0.0]],
        "min": [[0.0, 1.0], [0.0, 0.0]],
    }
    for fusion, want in expected.items():
        torch.testing.assert_close(attention_rollout([attn], head_fusion=fusion), torch.tensor([want]), msg=fusion)


def test_discard_ratio_drops_lowest_patches_but_keeps_cls_column():
    attn = torch.eye(N).repeat(1, 1, 1, 1)
    # The CLS column holds the smallest value of the row; it must survive discarding.
    attn[0, 0, 0] = torch.tensor([0.01, 0.4, 0.3, 0.2, 0.09])
    # Half of the 4 patch columns (0.2 and 0.09) are zeroed: [0.4, 0.3, 0, 0] -> [1, 0.75, 0, 0].
    torch.testing.assert_close(attention_rollout([attn], discard_ratio=0.5), torch.tensor([[[1.0, 0.75], [0.0, 0.0]]]))
    torch.testing.assert_close(
        attention_rollout([attn]), (torch.tensor([[[0.4, 0.3], [0.2, 0.09]]]) - 0.09) / 0.31
    )


@pytest.mark.parametrize("discard_ratio", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_each_image_is_independent_of_the_batch(discard_ratio, fusion):
    num_tokens = 1 + 16
    attn = _random_attention(batch=3, num_tokens=num_tokens)
    batched = attention_rollout(attn, head_fusion=fusion, discard_ratio=discard_ratio)
    assert batched.shape == (3, 4, 4)
    assert batched.amin(dim=(1, 2)).eq(0).all() and batched.amax(dim=(1, 2)).eq(1).all()
    for i in range(3):
        alone = attention_rollout([a[i : i + 1] for a in attn], head_fusion=fusion, discard_ratio=discard_ratio)
        torch.testing.assert_close(batched[i : i + 1], alone)
    # Changing another image must not change this one's map.
    attn[0] = attn[0].clone()
    attn[0][1:] = attn[0][1:].flip(-1)
    torch.testing.assert_close(attention_rollout(attn, head_fusion=fusion, discard_ratio=discard_ratio)[0], batched[0])


def test_distillation_row_is_averaged_with_cls():
    num_tokens = 2 + 4  # [CLS, DIST, p0..p3]
    attn = torch.eye(num_tokens).repeat(1, 1, 1, 1)
    attn[0, 0, 0] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])  # CLS -> p0
    attn[0, 0, 1] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])  # DIST -> p3
    both = attention_rollout([attn], num_prefix_tokens=2, token_rows=("cls", "dist"))
    torch.testing.assert_close(both, torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    cls_only = attention_rollout([attn], num_prefix_tokens=2)
    torch.testing.assert_close(cls_only, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))


def test_rectangular_grid():
    attn = _one_hot_attention(1 + 5, num_tokens=1 + 2 * 3)
    maps = attention_rollout([attn], grid_size=(2, 3))
    assert maps.shape == (1, 2, 3) and maps[0, 1, 2] == 1 and maps.sum() == 1


def test_bad_inputs_raise_clear_errors():
    good = [_one_hot_attention(1)]
    with pytest.raises(ValueError, match="non-empty"):
        attention_rollout([])
    with pytest.raises(ValueError, match=r"\(B, heads, N, N\)"):
        attention_rollout([torch.zeros(2, N, N)])
    with pytest.raises(ValueError, match="start_layer"):
        attention_rollout(good, start_layer=1)
    with pytest.raises(ValueError, match="discard_ratio"):
        attention_rollout(good, discard_ratio=1.0)
    with pytest.raises(ValueError, match="square grid"):
        attention_rollout([_one_hot_attention(1, num_tokens=1 + 6)])
    with pytest.raises(ValueError, match="grid_size"):
        attention_rollout(good, grid_size=(3, 3))
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(good, head_fusion="sum")
    with pytest.raises(ValueError, match="num_prefix_tokens=2"):
        attention_rollout(good, token_rows=("cls", "dist"))
    with pytest.raises(ValueError, match="layer 1"):
        attention_rollout(good + [_one_hot_attention(1, num_tokens=1 + 9)])


def test_overlay_shape_dtype_and_alpha_limits():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    out = overlay_heatmap(image, mask)
    assert out.shape == (40, 30, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(overlay_heatmap(image, mask, alpha=0.0), image)
    # alpha=1 on a constant mask is the colour map's colour everywhere.
    full = overlay_heatmap(image, np.ones((3, 3)), alpha=1.0)
    np.testing.assert_array_equal(full, np.broadcast_to(np.rint(np.array(matplotlib.colormaps["jet"](1.0)[:3]) * 255), full.shape))
    # The hot cell (top-left) ends up top-left after resizing: jet's red there; where the mask is 0
    # the image shows through unchanged (low weights are transparent, not a blue wash).
    heat = overlay_heatmap(image, mask, alpha=1.0)
    assert heat[0, 0, 0] > 100 and heat[0, 0, 2] < 50
    np.testing.assert_array_equal(heat[-10:, -10:], image[-10:, -10:])


def test_overlay_accepts_pil_and_rejects_bad_input():
    image = Image.new("L", (16, 12), 128)
    assert overlay_heatmap(image, np.zeros((2, 2))).shape == (12, 16, 3)
    with pytest.raises(ValueError, match="alpha"):
        overlay_heatmap(image, np.zeros((2, 2)), alpha=1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        overlay_heatmap(image, np.full((2, 2), 2.0))
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        overlay_heatmap(image, np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="uint8"):
        overlay_heatmap(np.zeros((4, 4, 3), dtype=np.float32), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="colormap"):
        overlay_heatmap(image, np.zeros((2, 2)), colormap="nope")


@pytest.mark.parametrize("distill", [False, True])
def test_rollout_on_a_tiny_melanoma_vit(distill):
    from model import MelanomaViTConfig, MelanomaViTForImageClassification

    config = MelanomaViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, use_distillation_token=distill, num_labels=7,
    )
    torch.manual_seed(0)
    model = MelanomaViTForImageClassification(config).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        attentions = model(x, output_attentions=True).attentions
    rows = ("cls", "dist") if distill else ("cls",)
    maps = attention_rollout(attentions, num_prefix_tokens=config.num_prefix_tokens, token_rows=rows, discard_ratio=0.25)
    assert maps.shape == (3, 4, 4)
    assert maps.amin(dim=(1, 2)).eq(0).all() and maps.amax(dim=(1, 2)).eq(1).all()
    with torch.no_grad():
        alone = model(x[1:2], output_attentions=True).attentions
    torch.testing.assert_close(
        attention_rollout(alone, num_prefix_tokens=config.num_prefix_tokens, token_rows=rows, discard_ratio=0.25), maps[1:2]
    )
