"""The restructured KeyRe-ID graph that gets exported (docs/contract.md §5): same outputs as
``reference_model``, about a third of the arithmetic.

Where the arithmetic goes:
- Preprocessing (uint8 -> /255 -> (x-0.5)/0.5) folds into the patch embedding, which becomes a
  patchify reshape and one matmul on the raw pixels.
- Only the [CLS] rows of b1.0 and b2.0 are used, so those blocks run single-query attention.
  The query is absorbed into the key and value projections (score_i = LN1(x_i) . (W_k^T q) and
  out = (sum_i p_i LN1(x_i)) W_v^T), so no K or V is ever computed for the 129 (or 6x129) rows.
- For the part block, LN1(w*x) = t(w) * gamma*(x - mean) + beta with t(w) = w / sqrt(w^2 var + eps)
  exactly, so the six part passes share one centred row matrix and differ only by t.
- The BatchNorms, the 1/6 and b2.1's affine fold into one scale and shift per part.
- GELU is spelled so that ONNX Runtime fuses it into one Gelu kernel (see ``ErfGelu``).
"""
import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from keyreid.contract import CLIP_FRAMES, MEAN_CAMERA, NUM_PARTS, PATCH_COLS, PATCH_ROWS, PATCH_SIZE
from keyreid.export.config import (BATCHNORM_EPS, CAMERA_EMBED_SCALE, PART_NORM_EPS, VIT_NORM_EPS,
                                   ModelConfig)
from keyreid.export.reference_model import Block, temporal_clip_shift_shuffle


class ErfGelu(nn.Module):
    """Exact (erf) GELU, written as ``x * 0.5 * (1 + erf(x / sqrt(2)))``.

    Same function as ``nn.GELU()``, but torch's own decomposition (``0.5 * (x * (...))``) is not a
    pattern ONNX Runtime's GeluFusion matches, which leaves five elementwise passes over the
    widest activation of every block; this spelling becomes one fused Gelu kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _batchnorm_affine(state_dict, prefix) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = x * scale + shift."""
    scale = state_dict[prefix + "weight"] / torch.sqrt(state_dict[prefix + "running_var"] + BATCHNORM_EPS)
    return scale, state_dict[prefix + "bias"] - state_dict[prefix + "running_mean"] * scale


class ClsQueryAttentionBlock(nn.Module):
    """A ViT block evaluated for the [CLS] row only, with K and V absorbed into the query.

    ``forward(normed_rows, cls_normed, cls_residual)`` takes LN1 of the key rows already (callers
    differ in how they get it), LN1 of the [CLS] row and the raw [CLS] row for the residual.
    """

    def __init__(self, state_dict, prefix: str, num_heads: int):
        super().__init__()
        weight = lambda name: state_dict[prefix + name].float().clone()
        qkv_weight, qkv_bias = weight("attn.qkv.weight"), weight("attn.qkv.bias")
        dim = qkv_weight.shape[1]
        head_dim = dim // num_heads
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, head_dim ** -0.5
        q_weight, k_weight, v_weight = qkv_weight.split(dim)
        q_bias, k_bias, v_bias = qkv_bias.split(dim)
        self.register_buffer("q_weight_t", q_weight.T.contiguous())
        self.register_buffer("q_bias", q_bias)
        self.register_buffer("k_weight_heads", k_weight.reshape(num_heads, head_dim, dim))  # h, d, C
        self.register_buffer("k_bias_heads", k_bias.reshape(num_heads, head_dim))
        self.register_buffer("v_weight_heads_t",
                             v_weight.reshape(num_heads, head_dim, dim).transpose(1, 2).contiguous())  # h, C, d
        self.register_buffer("v_bias", v_bias)
        self.register_buffer("norm1_weight", weight("norm1.weight"))
        self.register_buffer("norm1_bias", weight("norm1.bias"))
        # Keys and values of rows whose LN1 is t * gamma*(x - mean) + beta carry beta W^T + b.
        self.register_buffer("key_bias_rows", self.norm1_bias @ self.k_weight_heads.transpose(1, 2)
                             + self.k_bias_heads)
        self.register_buffer("value_bias_rows", self.norm1_bias @ self.v_weight_heads_t
                             + v_bias.reshape(num_heads, head_dim))
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_NORM_EPS)
        self.fc1 = nn.Linear(dim, weight("mlp.fc1.weight").shape[0])
        self.fc2 = nn.Linear(weight("mlp.fc1.weight").shape[0], dim)
        self.act = ErfGelu()
        for module, name in ((self.proj, "attn.proj"), (self.norm2, "norm2"), (self.fc1, "mlp.fc1"),
                             (self.fc2, "mlp.fc2")):
            module.weight.data.copy_(weight(name + ".weight"))
            module.bias.data.copy_(weight(name + ".bias"))
        self.requires_grad_(False)

    def norm1(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.norm1_weight, self.norm1_bias, VIT_NORM_EPS)

    def query(self, cls_normed: torch.Tensor) -> torch.Tensor:
        B = cls_normed.shape[0]
        return (cls_normed @ self.q_weight_t + self.q_bias).reshape(B, self.num_heads, self.head_dim)

    def absorbed_keys(self, query: torch.Tensor) -> torch.Tensor:
        """u_h = W_k,h^T q_h: a row's score for head h is LN1(row) . u_h (+ q_h . b_k,h)."""
        return (query.transpose(0, 1) @ self.k_weight_heads).transpose(0, 1)      # B, h, C

    def project_values(self, mixed_rows: torch.Tensor) -> torch.Tensor:
        """[..., h, C] mixtures of LN1 rows -> [..., h, d] value vectors (without the bias)."""
        lead = mixed_rows.shape[:-2]
        per_head = mixed_rows.reshape(-1, self.num_heads, mixed_rows.shape[-1]).transpose(0, 1)
        values = per_head @ self.v_weight_heads_t                                  # h, B', d
        return values.transpose(0, 1).reshape(*lead, self.num_heads, self.head_dim)

    def finish(self, cls_residual: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Output projection, residual and MLP for the [CLS] row(s). attended [..., h, d]."""
        x = cls_residual + self.proj(attended.flatten(-2))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Plain use: rows [B, L, C] (row 0 is [CLS]) -> block output of row 0, [B, C]."""
        normed = self.norm1(rows)
        query = self.query(normed[:, 0])
        scores = normed @ self.absorbed_keys(query).transpose(1, 2)               # B, L, h
        scores = scores + (query * self.k_bias_heads).sum(-1)[:, None, :]
        probs = torch.softmax(scores * self.scale, dim=1)                         # over L
        mixed = probs.transpose(1, 2) @ normed                                    # B, h, C
        attended = self.project_values(mixed) + self.v_bias.reshape(self.num_heads, self.head_dim)
        return self.finish(rows[:, 0], attended)


class DeployKeyReID(nn.Module):
    """Contract inputs (docs/contract.md §6) -> (embedding, part_weights), exported to ONNX.

    Args:
        checkpoint_state: the filtered upstream state dict (``load_checkpoint(...).state_dict``).
        config: its ModelConfig.
        part_weight_op: callable (keypoints, crop_size) -> part_weights [N, 128, 6]; the export
            passes the ``keyreid::KeypointPartPool`` custom op so it becomes one ONNX node.
    """

    def __init__(self, checkpoint_state, config: ModelConfig, part_weight_op):
        super().__init__()
        sd = {key: value.float() if value.is_floating_point() else value
              for key, value in checkpoint_state.items()}
        D, heads = config.embed_dim, config.num_heads
        self.config = config
        self.part_weight_op = part_weight_op

        # Patch embedding on raw uint8 pixels: conv(W, 2x/255 - 1) = (2W/255) . x + (b - sum W).
        conv_weight = sd["base.patch_embed.proj.weight"]                           # D, 3, 16, 16
        pixel_major = conv_weight.permute(2, 3, 1, 0).reshape(-1, D)               # (ky, kx, c), D
        self.register_buffer("patch_weight", (pixel_major * (2.0 / 255.0)).contiguous())
        self.register_buffer("patch_bias", sd["base.patch_embed.proj.bias"] - pixel_major.sum(0))
        pos_embed = sd["base.pos_embed"][0]
        self.register_buffer("cls_row", sd["base.cls_token"][0, 0] + pos_embed[0])
        self.register_buffer("patch_pos", pos_embed[1:].contiguous())
        cameras = sd["base.Cam"][:, 0]
        # Row 0 is the mean camera (index -1); rows 1..C are cameras 0..C-1.
        self.register_buffer("camera_table",
                             CAMERA_EMBED_SCALE * torch.cat([cameras.mean(0, keepdim=True), cameras]))
        self.blocks = nn.ModuleList(Block(D, heads, config.mlp_ratio) for _ in range(config.used_blocks))
        for index, block in enumerate(self.blocks):
            block.load_state_dict({key[len(f"base.blocks.{index}."):]: value for key, value in sd.items()
                                   if key.startswith(f"base.blocks.{index}.")})
            block.mlp.act = ErfGelu()
        self.blocks.requires_grad_(False)

        # Global branch: CLS-only b1.0, b1.1, temporal attention, bottleneck.
        self.global_block = ClsQueryAttentionBlock(sd, "b1.0.", heads)
        self.register_buffer("global_norm_weight", sd["b1.1.weight"])
        self.register_buffer("global_norm_bias", sd["b1.1.bias"])
        self.register_buffer("frame_attention_weight_t", sd["attention_conv.weight"][:, :, 0, 0].T.contiguous())
        self.register_buffer("frame_attention_bias", sd["attention_conv.bias"])
        self.register_buffer("temporal_attention_weight", sd["attention_tconv.weight"])
        self.register_buffer("temporal_attention_bias", sd["attention_tconv.bias"])
        global_scale, global_shift = _batchnorm_affine(sd, "bottleneck.")
        self.register_buffer("global_scale", global_scale)
        self.register_buffer("global_shift", global_shift)

        # Local branch: CLS-only b2.0 shared by the six parts, then b2.1 + bottleneck_p + 1/6.
        self.part_block = ClsQueryAttentionBlock(sd, "b2.0.", heads)
        part_scales, part_shifts = zip(*(_batchnorm_affine(sd, f"bottleneck_{p}.")
                                         for p in range(1, NUM_PARTS + 1)))
        part_scale = torch.stack(part_scales) / NUM_PARTS                        # 6, P
        part_shift = torch.stack(part_shifts) / NUM_PARTS
        self.register_buffer("part_scale", sd["b2.1.weight"] * part_scale)
        self.register_buffer("part_shift", sd["b2.1.bias"] * part_scale + part_shift)
        self.eval()

    def embed_patches(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N, T, 256, 128, 3] -> patch tokens [N*T, 128, D] in raster order."""
        N = frames.shape[0]
        patches = frames.reshape(N * CLIP_FRAMES, PATCH_ROWS, PATCH_SIZE, PATCH_COLS, PATCH_SIZE, 3)
        patches = patches.permute(0, 1, 3, 2, 4, 5).reshape(N * CLIP_FRAMES, PATCH_ROWS * PATCH_COLS, -1)
        return patches.float() @ self.patch_weight + self.patch_bias

    def camera_rows(self, camera: torch.Tensor) -> torch.Tensor:
        # Indices below -1 are mapped past the table so that lookup fails instead of wrapping.
        index = torch.where(camera < MEAN_CAMERA, self.camera_table.shape[0], camera - MEAN_CAMERA)
        return self.camera_table[index]                                            # N, D

    def backbone(self, frames: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        patches = self.embed_patches(frames) + self.patch_pos
        cls_rows = self.cls_row.expand(patches.shape[0], 1, -1)
        tokens = torch.cat([cls_rows, patches], dim=1)
        x = tokens + self.camera_rows(camera).repeat_interleave(CLIP_FRAMES, dim=0)[:, None, :]
        for block in self.blocks:
            x = block(x)
        return x                                                                   # N*T, 129, D

    def global_feature(self, features: torch.Tensor) -> torch.Tensor:
        N = features.shape[0] // CLIP_FRAMES
        frame_cls = F.layer_norm(self.global_block(features), features.shape[-1:],
                                 self.global_norm_weight, self.global_norm_bias, VIT_NORM_EPS)
        attention = F.relu(frame_cls @ self.frame_attention_weight_t + self.frame_attention_bias)
        attention = attention.reshape(N, CLIP_FRAMES, -1).transpose(1, 2)          # N, 256, T
        attention = F.relu(F.conv1d(attention, self.temporal_attention_weight,
                                    self.temporal_attention_bias, padding=1))[:, 0]  # N, T
        attention = torch.softmax(attention, dim=1)
        pooled = (frame_cls.reshape(N, CLIP_FRAMES, -1) * attention[:, :, None]).sum(dim=1)
        return pooled * self.global_scale + self.global_shift

    def part_features(self, features: torch.Tensor, part_weights: torch.Tensor) -> torch.Tensor:
        block = self.part_block
        N = part_weights.shape[0]
        patch_rows, token = temporal_clip_shift_shuffle(features, N)               # N, 128, P / N, 1, P
        token = token[:, 0]

        # LN1(w x) = t(w) * gamma*(x - mean) + beta, exactly: one centred matrix for all parts.
        centred = patch_rows - patch_rows.mean(dim=-1, keepdim=True)
        variance = (centred * centred).mean(dim=-1, keepdim=True)                  # N, 128, 1
        scaled_rows = centred * block.norm1_weight                                 # N, 128, P
        row_scale = part_weights / torch.sqrt(part_weights * part_weights * variance + VIT_NORM_EPS)
        row_scale = row_scale.transpose(1, 2)[:, :, None, :]                       # N, 6, 1, 128

        token_normed = block.norm1(token)
        query = block.query(token_normed)                                          # N, h, d
        heads, head_dim = block.num_heads, block.head_dim
        keys = block.absorbed_keys(query)                                          # N, h, C

        # The [CLS] row goes through the absorbed key and the shared value projection like the
        # others, so no key or value of its own is computed (each would read a C x C weight).
        row_dot = scaled_rows @ keys.transpose(1, 2)                               # N, 128, h
        row_scores = row_scale * row_dot.transpose(1, 2)[:, None] \
            + (query * block.key_bias_rows).sum(-1)[:, None, :, None]              # N, 6, h, 128
        token_score = (keys @ token_normed[:, :, None]) \
            + (query * block.k_bias_heads).sum(-1, keepdim=True)                  # N, h, 1
        token_score = token_score[:, None].expand(-1, NUM_PARTS, -1, -1)
        probs = torch.softmax(torch.cat([token_score, row_scores], dim=-1) * block.scale, dim=-1)
        token_prob, row_probs = probs[..., :1], probs[..., 1:]                      # N,6,h,1 / N,6,h,128

        mixed = ((row_probs * row_scale).reshape(N, NUM_PARTS * heads, -1) @ scaled_rows).reshape(
            N, NUM_PARTS, heads, -1) + token_prob * token_normed[:, None, None, :]   # N, 6, h, C
        attended = block.project_values(mixed) + token_prob * block.v_bias.reshape(heads, head_dim) \
            + row_probs.sum(-1, keepdim=True) * block.value_bias_rows
        cls_out = block.finish(token[:, None, :], attended)                        # N, 6, P
        normed = F.layer_norm(cls_out, cls_out.shape[-1:], None, None, PART_NORM_EPS)
        return (normed * self.part_scale + self.part_shift).reshape(N, -1)

    def forward(self, frames, keypoints, crop_size, camera):
        part_weights = self.part_weight_op(keypoints, crop_size)
        features = self.backbone(frames, camera)
        embedding = torch.cat([self.global_feature(features),
                               self.part_features(features, part_weights)], dim=1)
        return embedding, part_weights
