"""docs/contract.md §2 written out a second time, literally and per clip, with torch.nn.functional on
the raw state dict. It shares no code with keyreid.export, so agreement means both read the
spec the same way."""
import math

import torch
import torch.nn.functional as F


def _block(x, sd, prefix, heads):
    N, C = x.shape
    h = F.layer_norm(x, (C,), sd[prefix + "norm1.weight"], sd[prefix + "norm1.bias"], 1e-6)
    q, k, v = F.linear(h, sd[prefix + "attn.qkv.weight"], sd[prefix + "attn.qkv.bias"]).split(C, dim=1)
    d = C // heads
    out = torch.empty_like(x)
    for head in range(heads):
        cols = slice(head * d, (head + 1) * d)
        scores = torch.softmax(q[:, cols] @ k[:, cols].T / math.sqrt(d), dim=1)
        out[:, cols] = scores @ v[:, cols]
    x = x + F.linear(out, sd[prefix + "attn.proj.weight"], sd[prefix + "attn.proj.bias"])
    h = F.layer_norm(x, (C,), sd[prefix + "norm2.weight"], sd[prefix + "norm2.bias"], 1e-6)
    h = F.gelu(F.linear(h, sd[prefix + "mlp.fc1.weight"], sd[prefix + "mlp.fc1.bias"]))
    return x + F.linear(h, sd[prefix + "mlp.fc2.weight"], sd[prefix + "mlp.fc2.bias"])


def _batchnorm(x, sd, prefix):
    return ((x - sd[prefix + "running_mean"]) / torch.sqrt(sd[prefix + "running_var"] + 1e-5)
            * sd[prefix + "weight"] + sd[prefix + "bias"])


@torch.no_grad()
def spec_clip_embedding(sd, frames_uint8, part_weights, camera, heads, used_blocks):
    """frames_uint8 [4, 256, 128, 3]; part_weights [128, 6]; camera int (-1: mean camera)."""
    images = (torch.as_tensor(frames_uint8).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    D = sd["base.cls_token"].shape[-1]
    patches = F.conv2d(images, sd["base.patch_embed.proj.weight"], sd["base.patch_embed.proj.bias"],
                       stride=16)                                   # 4, D, 16, 8
    patches = patches.reshape(4, D, 128).transpose(1, 2)            # raster order
    cam = sd["base.Cam"].mean(0) if camera == -1 else sd["base.Cam"][camera]
    tokens = torch.cat([sd["base.cls_token"][0].expand(4, 1, D), patches], dim=1)
    tokens = tokens + sd["base.pos_embed"] + 3.0 * cam
    frames = []
    for f in range(4):
        x = tokens[f]
        for b in range(used_blocks):
            x = _block(x, sd, f"base.blocks.{b}.", heads)
        frames.append(x)
    features = torch.stack(frames)                                  # 4, 129, D

    g = torch.stack([F.layer_norm(_block(features[f], sd, "b1.0.", heads), (D,), sd["b1.1.weight"],
                                  sd["b1.1.bias"], 1e-6)[0] for f in range(4)])          # 4, D
    a = F.relu(g @ sd["attention_conv.weight"][:, :, 0, 0].T + sd["attention_conv.bias"])  # 4, 256
    a = F.relu(F.conv1d(a.T[None], sd["attention_tconv.weight"], sd["attention_tconv.bias"],
                        padding=1))[0, 0]                            # 4
    a = torch.softmax(a, dim=0)
    parts = [_batchnorm((a[:, None] * g).sum(0), sd, "bottleneck.")]

    R = features.reshape(-1).reshape(129, 4 * D)
    token = R[0]
    P = torch.cat([R[5:129], R[1:5]])
    S = torch.empty_like(P)
    for i in range(64):
        S[2 * i], S[2 * i + 1] = P[i], P[64 + i]
    for p in range(6):
        seq = torch.cat([token[None], S * part_weights[:, p:p + 1]])
        y = _block(seq, sd, "b2.0.", heads)
        y = F.layer_norm(y, (4 * D,), sd["b2.1.weight"], sd["b2.1.bias"], 1e-5)[0]
        parts.append(_batchnorm(y, sd, f"bottleneck_{p + 1}.") / 6)
    return torch.cat(parts)
