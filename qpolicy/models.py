"""DDPM-style U-Net denoiser in Flax linen with stable, readable layer names.

``eps = UNet(cfg).apply({"params": p}, x, t)`` with x: (B, H, W, C) float32 in [-1, 1] and
t: (B,) integer or float training timesteps. Layer paths look like
``conv_in``, ``time/dense_0``, ``down_0/block_1/conv_0``, ``down_1/attn_0/qkv``,
``mid/attn/proj``, ``up_0/upsample/conv``, ``conv_out``; the quantization layer registry keeps
these paths, so schedules exported for one checkpoint name the same layers forever.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """U-Net hyper-parameters (frozen, keyword-only, validated).

    image_size: input height = width in pixels; must be divisible by 2**(len(channel_mults)-1).
    in_channels: image channels (1 grey, 3 RGB); the output has the same count (eps).
    base_channels: channels at the first level; level i has base_channels * channel_mults[i].
    num_res_blocks: ResBlocks per level on the way down (the way up has one more).
    attn_resolutions: feature-map sizes (pixels) at which self-attention follows each block.
    dropout: dropout rate inside ResBlocks (training only).
    num_groups: GroupNorm groups (must divide every level's channel count).
    num_classes: class labels of a conditional model (0 = unconditional); label num_classes is the null label,
        embedded and added to the time embedding (``label`` nn.Embed: not a quantizable layer).
    """

    image_size: int = 16
    in_channels: int = 1
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (8,)
    dropout: float = 0.0
    num_groups: int = 8
    num_classes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.image_size < 4:
            raise ValueError(f"UNetConfig.image_size must be >= 4, got {self.image_size}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"UNetConfig.in_channels must be 1 or 3, got {self.in_channels}")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"UNetConfig.channel_mults must be non-empty positive ints, got {self.channel_mults}")
        down = 2 ** (len(self.channel_mults) - 1)
        if self.image_size % down:
            raise ValueError(
                f"UNetConfig.image_size={self.image_size} must be divisible by 2**(len(channel_mults)-1)={down}")
        if self.num_classes < 0 or self.num_classes == 1:
            raise ValueError(f"UNetConfig.num_classes must be 0 (unconditional) or >= 2, got {self.num_classes}")
        if self.num_res_blocks < 1:
            raise ValueError(f"UNetConfig.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        for m in self.channel_mults:
            if (self.base_channels * m) % self.num_groups:
                raise ValueError(
                    f"UNetConfig.num_groups={self.num_groups} must divide every level's channels "
                    f"(base_channels * mult = {self.base_channels * m})")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        d["attn_resolutions"] = list(self.attn_resolutions)
        if not self.num_classes:  # unconditional checkpoints keep the config they were written with
            del d["num_classes"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {sorted(unknown)}; accepted: {sorted(known)}")
        return cls(**d)


#: Size presets. ``tiny`` is for tests; ``digits16`` and ``patches32`` are the shipped models.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4),
    "small": dict(base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8),
    "medium": dict(base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,),
                   num_groups=16, dropout=0.1),
}


def preset_config(preset: str, *, image_size: int, in_channels: int, **overrides: Any) -> UNetConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; accepted: {sorted(PRESETS)}")
    return UNetConfig(image_size=image_size, in_channels=in_channels, **{**PRESETS[preset], **overrides})


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding (B,) -> (B, dim) as in DDPM / Transformer positional encodings."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv x2 with the time embedding added between; 1x1 ``skip`` if channels change."""

    channels: int
    num_groups: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, temb, train: bool = False):
        h = nn.silu(nn.GroupNorm(self.num_groups, name="norm_0")(x))
        h = nn.Conv(self.channels, (3, 3), name="conv_0")(h)
        h = h + nn.Dense(self.channels, name="temb")(nn.silu(temb))[:, None, None, :]
        h = nn.silu(nn.GroupNorm(self.num_groups, name="norm_1")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Conv(self.channels, (3, 3), name="conv_1")(h)
        if x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1), name="skip")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions: ``qkv`` (Dense 3C) and ``proj`` (Dense C)."""

    num_groups: int

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = nn.GroupNorm(self.num_groups, name="norm")(x).reshape(b, h * w, c)
        q, k, v = jnp.split(nn.Dense(3 * c, name="qkv")(y), 3, axis=-1)
        logits = jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(c)
        y = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1), v)
        y = nn.Dense(c, name="proj")(y)
        return x + y.reshape(b, h, w, c)


class Downsample(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x):
        return nn.Conv(self.channels, (3, 3), strides=(2, 2), name="conv")(x)


class Upsample(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
        return nn.Conv(self.channels, (3, 3), name="conv")(x)


class Level(nn.Module):
    """One resolution level: ResBlocks (+ attention), then down/upsampling. ``up`` levels consume skips."""

    cfg: UNetConfig
    level: int
    up: bool

    @nn.compact
    def __call__(self, x, temb, skips: list, train: bool = False):
        cfg = self.cfg
        ch = cfg.base_channels * cfg.channel_mults[self.level]
        use_attn = x.shape[1] in cfg.attn_resolutions
        n = cfg.num_res_blocks + (1 if self.up else 0)
        outs = []
        for j in range(n):
            if self.up:
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = ResBlock(ch, cfg.num_groups, cfg.dropout, name=f"block_{j}")(x, temb, train)
            if use_attn:
                x = AttnBlock(cfg.num_groups, name=f"attn_{j}")(x)
            outs.append(x)
        last = len(cfg.channel_mults) - 1
        if not self.up and self.level != last:
            x = Downsample(ch, name="downsample")(x)
            outs.append(x)
        if self.up and self.level != 0:
            x = Upsample(ch, name="upsample")(x)
        return x, outs


class Mid(nn.Module):
    cfg: UNetConfig

    @nn.compact
    def __call__(self, x, temb, train: bool = False):
        cfg = self.cfg
        ch = x.shape[-1]
        x = ResBlock(ch, cfg.num_groups, cfg.dropout, name="block_0")(x, temb, train)
        x = AttnBlock(cfg.num_groups, name="attn")(x)
        return ResBlock(ch, cfg.num_groups, cfg.dropout, name="block_1")(x, temb, train)


class TimeEmbed(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, t):
        e = timestep_embedding(t, self.dim)
        e = nn.Dense(4 * self.dim, name="dense_0")(e)
        return nn.Dense(4 * self.dim, name="dense_1")(nn.silu(e))


class UNet(nn.Module):
    """eps-prediction U-Net. ``__call__(x (B,H,W,C), t (B,), y=None, train=False) -> eps (B,H,W,C)``; ``y`` (B,)
    class labels of a conditional model (``cfg.num_classes`` > 0; None or ``num_classes`` = the null label)."""

    cfg: UNetConfig

    @nn.compact
    def __call__(self, x, t, y=None, train: bool = False):
        cfg = self.cfg
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        temb = TimeEmbed(cfg.base_channels, name="time")(t)
        if cfg.num_classes:
            y = jnp.full((x.shape[0],), cfg.num_classes, jnp.int32) if y is None else jnp.asarray(y, jnp.int32)
            temb = temb + nn.Embed(cfg.num_classes + 1, temb.shape[-1], name="label")(y)
        h = nn.Conv(cfg.base_channels, (3, 3), name="conv_in")(x)
        skips = [h]
        for i in range(len(cfg.channel_mults)):
            h, outs = Level(cfg, i, up=False, name=f"down_{i}")(h, temb, [], train)
            skips.extend(outs)
        h = Mid(cfg, name="mid")(h, temb, train)
        for i in reversed(range(len(cfg.channel_mults))):
            h, _ = Level(cfg, i, up=True, name=f"up_{i}")(h, temb, skips, train)
        h = nn.silu(nn.GroupNorm(cfg.num_groups, name="norm_out")(h))
        return nn.Conv(cfg.in_channels, (3, 3), name="conv_out")(h)


def init_unet(cfg: UNetConfig, key: jax.Array) -> tuple[UNet, Any]:
    """Build the module and initialise its params; returns (module, params)."""
    model = UNet(cfg)
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)
    params = model.init(key, x, jnp.zeros((1,), jnp.int32))["params"]
    return model, params


def count_params(params: Any) -> int:
    return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
