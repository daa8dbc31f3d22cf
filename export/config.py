"""Model dimensions, read off a checkpoint's tensor shapes (docs/contract.md §1).

Only the width and the number of blocks vary between checkpoints we accept; the input geometry
(4 frames of 256x128, 16x16 patches, 6 parts) is fixed by the contract. Heads follow the ViT rule
of 64-wide heads in the backbone (ViT-S/B/L all do); the part block uses the same head count.
"""
from dataclasses import dataclass

from keyreid.contract import CLIP_FRAMES, embedding_dim

BACKBONE_HEAD_DIM = 64
ATTENTION_POOL_DIM = 256      # attention_conv output channels (upstream middle_dim)
CAMERA_EMBED_SCALE = 3.0      # upstream cam_lambda
VIT_NORM_EPS = 1e-6           # LayerNorms inside ViT blocks, base.norm and b1.1
PART_NORM_EPS = 1e-5          # b2.1 is a plain nn.LayerNorm(3072): torch's default eps
BATCHNORM_EPS = 1e-5


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of one KeyRe-ID checkpoint.

    Args:
        embed_dim: backbone width D (768 for ViT-B).
        depth: blocks stored in the backbone (12); inference runs the first ``depth - 1``.
        num_cameras: rows of the camera embedding ``base.Cam``.
        num_identities: classifier rows (training only; 0 when the checkpoint has none).
        mlp_ratio: MLP hidden width over block width.
    """

    embed_dim: int = 768
    depth: int = 12
    num_cameras: int = 6
    num_identities: int = 625
    mlp_ratio: int = 4

    @property
    def num_heads(self) -> int:
        return self.embed_dim // BACKBONE_HEAD_DIM

    @property
    def part_dim(self) -> int:
        """Width of a part feature: the 4 frames' features of one token row side by side."""
        return CLIP_FRAMES * self.embed_dim

    @property
    def used_blocks(self) -> int:
        return self.depth - 1

    @property
    def embedding_dim(self) -> int:
        return embedding_dim(self.embed_dim)


VIT_B = ModelConfig()
# Same code, a fraction of the arithmetic: for tests that need the structure, not the size.
REDUCED = ModelConfig(embed_dim=128, depth=3, num_cameras=6, num_identities=10)
