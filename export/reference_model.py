"""KeyRe-ID as upstream computes it at inference, structure for structure (docs/contract.md §2).

This module is the yardstick for accuracy and speed: it keeps upstream's module names (so a
checkpoint loads strictly), its full 129-token passes through the last blocks and its six
separate part passes. Keep it faithful rather than fast; the fast graph is ``deploy_model``.

Inputs are normalised frames and the part weights W of ``keyreid.kernels`` (upstream feeds
heatmaps and pools them to W inside the model; the op owns that step here).
"""
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from keyreid.contract import (CLIP_FRAMES, IMAGE_HEIGHT, IMAGE_WIDTH, MEAN_CAMERA, NUM_PARTS, camera_problem,
                              NUM_PATCHES, NUM_TOKENS, PATCH_SIZE)
from keyreid.errors import KeyreidError
from keyreid.export.config import (ATTENTION_POOL_DIM, BATCHNORM_EPS, CAMERA_EMBED_SCALE,
                                   PART_NORM_EPS, VIT_NORM_EPS, ModelConfig)

TCSS_SHIFT = 5   # upstream shift_num


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each B, heads, N, head_dim
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()  # exact (erf) GELU, as upstream
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=VIT_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_NORM_EPS)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B, 128 patches (raster), D


class Backbone(nn.Module):
    """upstream ``base``: patch embedding, [CLS], position + camera embedding, blocks 0..depth-2."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D = config.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, NUM_TOKENS, D))
        self.Cam = nn.Parameter(torch.zeros(config.num_cameras, 1, D))
        self.patch_embed = PatchEmbed(D)
        self.blocks = nn.ModuleList(
            Block(D, config.num_heads, config.mlp_ratio) for _ in range(config.used_blocks))

    def camera_embedding(self, camera: torch.Tensor) -> torch.Tensor:
        """Rows of Cam for each camera index; MEAN_CAMERA selects their mean (unseen cameras)."""
        table = torch.cat([self.Cam, self.Cam.mean(dim=0, keepdim=True)], dim=0)
        return table[torch.where(camera == MEAN_CAMERA, self.Cam.shape[0], camera)]

    def forward(self, images: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed + CAMERA_EMBED_SCALE * self.camera_embedding(camera)
        for block in self.blocks:
            x = block(x)
        return x


def temporal_clip_shift_shuffle(features: torch.Tensor, clips: int):
    """Upstream TCSS: reinterpret each clip's [T,129,D] buffer as [129, T*D] rows, take row 0 as
    the token, rotate rows 1..128 by the shift, then interleave the two halves."""
    rows = features.reshape(clips, NUM_TOKENS, -1)           # the buffer reinterpretation
    token = rows[:, 0:1]
    shifted = torch.cat([rows[:, TCSS_SHIFT:], rows[:, 1:TCSS_SHIFT]], dim=1)
    B, N, C = shifted.shape
    shuffled = shifted.reshape(B, 2, N // 2, C).transpose(1, 2).reshape(B, N, C)
    return shuffled, token


class KeyReIDReference(nn.Module):
    """Upstream KeyRe-ID in eval mode. ``forward`` returns the [B, 25*D] embedding."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D, P = config.embed_dim, config.part_dim
        self.config = config
        self.base = Backbone(config)
        self.b1 = nn.Sequential(Block(D, config.num_heads, config.mlp_ratio),
                                nn.LayerNorm(D, eps=VIT_NORM_EPS))
        self.bottleneck = nn.BatchNorm1d(D, eps=BATCHNORM_EPS)
        self.b2 = nn.Sequential(Block(P, config.num_heads, config.mlp_ratio),
                                nn.LayerNorm(P, eps=PART_NORM_EPS))
        for part in range(1, NUM_PARTS + 1):
            self.add_module(f"bottleneck_{part}", nn.BatchNorm1d(P, eps=BATCHNORM_EPS))
        self.attention_conv = nn.Conv2d(D, ATTENTION_POOL_DIM, kernel_size=1)
        self.attention_tconv = nn.Conv1d(ATTENTION_POOL_DIM, 1, kernel_size=3, padding=1)
        self.eval()

    def part_bottleneck(self, part: int) -> nn.BatchNorm1d:
        return getattr(self, f"bottleneck_{part + 1}")

    def global_feature(self, features: torch.Tensor, clips: int) -> torch.Tensor:
        frame_cls = self.b1(features)[:, 0]                                   # B*T, D
        attention = F.relu(self.attention_conv(frame_cls[:, :, None, None]))  # B*T, 256, 1, 1
        attention = attention.reshape(clips, CLIP_FRAMES, -1).permute(0, 2, 1)
        attention = F.relu(self.attention_tconv(attention)).reshape(clips, CLIP_FRAMES)
        attention = attention.softmax(dim=1)
        pooled = (frame_cls.reshape(clips, CLIP_FRAMES, -1) * attention[:, :, None]).sum(dim=1)
        return self.bottleneck(pooled)

    def part_features(self, features: torch.Tensor, part_weights: torch.Tensor, clips: int):
        patch_rows, token = temporal_clip_shift_shuffle(features, clips)
        parts = []
        for part in range(NUM_PARTS):
            # W is indexed by raster patch although the rows were shuffled: upstream does this.
            weighted = patch_rows * part_weights[:, :, part:part + 1]
            cls_out = self.b2(torch.cat([token, weighted], dim=1))[:, 0]
            parts.append(self.part_bottleneck(part)(cls_out) / NUM_PARTS)
        return parts

    def forward(self, images: torch.Tensor, part_weights: torch.Tensor,
                camera: torch.Tensor) -> torch.Tensor:
        """images [B, T, 3, 256, 128] normalised; part_weights [B, 128, 6]; camera [B] int64."""
        B, T = images.shape[:2]
        frames = images.reshape(B * T, *images.shape[2:])
        features = self.base(frames, camera.repeat_interleave(T))          # B*T, 129, D
        return torch.cat([self.global_feature(features, B),
                          *self.part_features(features, part_weights, B)], dim=1)


def normalize_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [N, T, H, W, 3] RGB -> float [N, T, 3, H, W]: ToTensor (/255) then Normalize(0.5, 0.5)."""
    images = frames.permute(0, 1, 4, 2, 3).float().div(255)
    return (images - 0.5) / 0.5


def check_cameras(camera: np.ndarray, num_cameras: int) -> None:
    problems = [problem for problem in (camera_problem(int(index), num_cameras) for index in np.unique(camera))
                if problem]
    if problems:
        raise KeyreidError(problems[0])


@torch.no_grad()
def reference_outputs(model: KeyReIDReference, frames: np.ndarray, keypoints: np.ndarray,
                      crop_size: np.ndarray, camera: np.ndarray, heatmap_mode: str = "max",
                      part_weights: Optional[np.ndarray] = None) -> dict:
    """Run the reference on contract inputs (docs/contract.md §6) -> {"embedding", "part_weights"}."""
    if frames.shape[2:] != (IMAGE_HEIGHT, IMAGE_WIDTH, 3):
        raise KeyreidError(f"frames must be [N, 4, {IMAGE_HEIGHT}, {IMAGE_WIDTH}, 3] uint8, "
                           f"got {list(frames.shape)}")
    camera = np.asarray(camera, dtype=np.int64)
    check_cameras(camera, model.config.num_cameras)
    if part_weights is None:
        from keyreid.kernels import part_weights as compute_part_weights

        part_weights = compute_part_weights(keypoints, crop_size, mode=heatmap_mode)
    assert part_weights.shape[1:] == (NUM_PATCHES, NUM_PARTS)
    embedding = model(normalize_frames(torch.from_numpy(np.ascontiguousarray(frames))),
                      torch.from_numpy(part_weights), torch.from_numpy(camera))
    return {"embedding": embedding.numpy(), "part_weights": part_weights}
