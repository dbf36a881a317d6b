"""Networks: the class-conditional diffusion U-Net and the supervised segmentation U-Nets.

ConditionalUNet follows improved-diffusion's UNetModel (Nichol & Dhariwal 2021): a sinusoidal
time embedding through an MLP, a class embedding added to it, ResBlocks (GroupNorm, SiLU,
embedding projection), self-attention at chosen feature-map resolutions. It knows nothing of the
noise schedule. The forward pass has no Python-side per-sample logic, so it compiles without
graph breaks and runs under bf16 autocast and channels_last.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PADDING_MODES = ("zeros", "reflect")


def _check_padding(padding: str) -> str:
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    return padding


def conv3x3(cin: int, cout: int, padding: str, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, padding_mode=padding)


def group_norm(channels: int) -> nn.GroupNorm:
    """32 groups as in improved-diffusion; fewer when a tiny test model has fewer channels."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero the last layer of a residual branch so every block starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), improved-diffusion's convention (cos then sin)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, then GroupNorm modulated by the embedding (scale and shift, improved-diffusion's
    use_scale_shift_norm), SiLU-dropout-conv, plus skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, padding: str):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(cin), nn.SiLU(), conv3x3(cin, cout, padding))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.out_norm = group_norm(cout)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), zero_init(conv3x3(cout, cout, padding)))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions of a feature map (scaled_dot_product_attention)."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        # tokens-last layout: a free view under channels_last, and head_dim contiguous for flash attention
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, 3C)
        q, k, v = qkv.reshape(b, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, head_dim)
        out = out.transpose(1, 2).reshape(b, h * w, c).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: str):
        super().__init__()
        self.conv = conv3x3(channels, channels, padding, stride=2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, padding: str):
        super().__init__()
        self.conv = conv3x3(channels, channels, padding)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbedSequential(nn.ModuleList):
    """Runs its layers in order; every layer takes (x, emb), the ones without conditioning ignore emb."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb)
        return x


class ConditionalUNet(nn.Module):
    """eps_theta(x_t, t, y): class-conditional noise predictor.

    attention_resolutions are feature-map sizes in pixels at the given image_size (16 means the
    16x16 level of a 128 px model). With class_dropout > 0 the class embedding has one extra row,
    the null class (label == num_classes), for classifier-free guidance. The defaults give
    13,635,203 parameters at 128 px (the paper's model has about 13.8M).
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2, 3),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_heads: int = 4,
        dropout: float = 0.1,
        num_classes: int = 2,
        class_dropout: float = 0.0,
        padding: str = "zeros",
        image_size: int = 128,
    ):
        super().__init__()
        _check_padding(padding)
        levels = len(channel_mult)
        if image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {image_size} must be divisible by 2**{levels - 1} for {levels} levels")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.null_label = num_classes if class_dropout > 0 else None
        self.base_channels = base_channels
        emb_dim = 4 * base_channels
        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(num_classes + (1 if class_dropout > 0 else 0), emb_dim)
        attn_at = set(int(r) for r in attention_resolutions)

        def block_list(cin: int, cout: int, res: int) -> list[nn.Module]:
            layers: list[nn.Module] = [ResBlock(cin, cout, emb_dim, dropout, padding)]
            if res in attn_at:
                layers.append(AttentionBlock(cout, num_heads))
            return layers

        self.input_conv = conv3x3(in_channels, base_channels, padding)
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch, res = base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(EmbedSequential(block_list(ch, base_channels * mult, res)))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level < levels - 1:
                self.down.append(EmbedSequential([Downsample(ch, padding)]))
                skip_channels.append(ch)
                res //= 2
        self.middle = EmbedSequential(
            [ResBlock(ch, ch, emb_dim, dropout, padding), AttentionBlock(ch, num_heads),
             ResBlock(ch, ch, emb_dim, dropout, padding)]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = block_list(ch + skip_channels.pop(), base_channels * mult, res)
                ch = base_channels * mult
                if level > 0 and i == num_res_blocks:
                    layers.append(Upsample(ch, padding))
                    res *= 2
                self.up.append(EmbedSequential(layers))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_init(conv3x3(ch, in_channels, padding)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B,C,H,W), t (B,) long, y (B,) long -> predicted noise (B,C,H,W)."""
        return self.forward_with_features(x, t, y, ())[0]

    def forward_with_features(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                              blocks: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(predicted noise, outputs of the decoder blocks ``blocks``): the same noise as forward.

        Decoder block k is ``self.up[k]`` (0 = deepest); its output is at that block's own resolution
        (after its upsampling, if it has one). Used as per-pixel features (diffseg.features).
        """
        bad = [k for k in blocks if not 0 <= k < len(self.up)]
        if bad:
            raise ValueError(f"decoder blocks {bad} outside [0, {len(self.up)}) for this model")
        emb = self.time_embed(timestep_embedding(t, self.base_channels)) + self.label_embed(y)
        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        features = {}
        for k, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if k in blocks:
                features[k] = h
        return self.out(h), [features[k] for k in blocks]

    def decoder_channels(self) -> list[int]:
        """Output channels of each decoder block (the feature widths forward_with_features returns)."""
        return [block[0].out_norm.num_channels for block in self.up]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- supervised baselines


class DoubleConv(nn.Sequential):
    """(conv3x3 - BatchNorm - ReLU) x 2, the classic U-Net stage."""

    def __init__(self, cin: int, cout: int, padding: str):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, padding_mode=padding, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, padding_mode=padding, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class AttentionGate(nn.Module):
    """Additive attention gate of Oktay et al. (2018): the decoder signal g weights the skip x."""

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int):
        super().__init__()
        self.w_x = nn.Sequential(
            nn.Conv2d(skip_channels, inter_channels, 1, bias=False), nn.BatchNorm2d(inter_channels)
        )
        self.w_g = nn.Sequential(nn.Conv2d(gate_channels, inter_channels, 1), nn.BatchNorm2d(inter_channels))
        self.psi = nn.Sequential(nn.Conv2d(inter_channels, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * self.psi(F.relu(self.w_x(x) + self.w_g(g)))


class SegUNet(nn.Module):
    """Plain U-Net (attention=False) or Attention U-Net (attention=True); one logit channel.

    depth is the number of 2x downsamplings; channels double per level from base_channels
    (base 32, depth 4: 32..512, about 7.8M parameters).
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 32, depth: int = 4, attention: bool = False,
                 padding: str = "zeros"):
        super().__init__()
        _check_padding(padding)
        self.depth = depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.encoders.append(DoubleConv(cin, w, padding))
            cin = w
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.decoders = nn.ModuleList(DoubleConv(2 * widths[i], widths[i], padding) for i in reversed(range(depth)))
        self.gates = nn.ModuleList(
            AttentionGate(widths[i], widths[i], max(widths[i] // 2, 1)) if attention else nn.Identity()
            for i in reversed(range(depth))
        )
        self.attention = attention
        self.head = nn.Conv2d(base_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B,C,H,W) with H, W divisible by 2**depth -> lesion logits (B,1,H,W)."""
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, gate, dec in zip(self.ups, self.gates, self.decoders):
            x = up(x)
            skip = skips.pop()
            skip = gate(skip, x) if self.attention else skip
            x = dec(torch.cat([skip, x], dim=1))
        return self.head(x)
