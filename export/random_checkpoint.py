"""Write a random checkpoint in the upstream format (docs/contract.md §1), for tests and the demo.

It carries every key upstream saves, including the ones inference ignores (the last backbone
block, base.norm, base.fc, the classifiers, and ``block1`` sharing b2.0's tensors), with
BatchNorm statistics away from their defaults so folding them is actually exercised.

    python export/random_checkpoint.py demo/random_keyreid.pth [--reduced] [--seed 0]
"""
import argparse
import sys
from pathlib import Path
from typing import Dict

import torch

from keyreid.cli import run_main
from keyreid.errors import KeyreidError
from keyreid.files import atomic_output, check_writable
from keyreid.export.config import REDUCED, VIT_B, ModelConfig
from keyreid.export.reference_model import Block, KeyReIDReference


def _random_like(name: str, template: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    shape = template.shape
    if name.endswith("num_batches_tracked"):
        return torch.tensor(1000, dtype=torch.long)
    if name.endswith("running_var"):
        return torch.rand(shape, generator=generator) * 1.5 + 0.5
    if name.endswith("running_mean"):
        return torch.randn(shape, generator=generator) * 0.1
    is_norm = ".norm" in name or name.startswith(("b1.1", "b2.1", "bottleneck"))
    if is_norm and name.endswith("weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if name.endswith("bias"):
        return 0.02 * torch.randn(shape, generator=generator)
    std = 0.05 if name.startswith("attention_") else 0.02
    return std * torch.randn(shape, generator=generator)


# Scaling these shrinks the residual stream, so that LayerNorm's epsilon is no longer negligible
# against the part-weighted rows: then part weights W move the embedding (docs/contract.md §5 caveat).
_RESIDUAL_WRITERS = ("base.cls_token", "base.pos_embed", "base.Cam", "base.patch_embed.proj.",
                     ".attn.proj.", ".mlp.fc2.")


def random_state_dict(config: ModelConfig = VIT_B, seed: int = 0,
                      residual_scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """A state dict with upstream's keys and shapes for ``config`` (no file written)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        used = KeyReIDReference(config).state_dict()
        last_block = Block(config.embed_dim, config.num_heads, config.mlp_ratio).state_dict()
    state_dict = {name: _random_like(name, tensor, generator) for name, tensor in used.items()}
    for name, tensor in last_block.items():
        key = f"base.blocks.{config.depth - 1}.{name}"
        state_dict[key] = _random_like(key, tensor, generator)
    D, K = config.embed_dim, max(config.num_identities, 1)
    state_dict["base.norm.weight"] = 1.0 + 0.1 * torch.randn(D, generator=generator)
    state_dict["base.norm.bias"] = 0.02 * torch.randn(D, generator=generator)
    state_dict["base.fc.weight"] = 0.02 * torch.randn(1000, D, generator=generator)
    state_dict["base.fc.bias"] = torch.zeros(1000)
    state_dict["classifier.weight"] = 0.001 * torch.randn(K, D, generator=generator)
    for part in range(1, 7):
        state_dict[f"classifier_{part}.weight"] = 0.001 * torch.randn(K, config.part_dim,
                                                                       generator=generator)
    if residual_scale != 1.0:
        for name in state_dict:
            if name.startswith("base.") and any(marker in name for marker in _RESIDUAL_WRITERS):
                state_dict[name] = state_dict[name] * residual_scale
    # upstream registers the part block twice (self.block1 and self.b2[0]): same tensors.
    for name in [key for key in state_dict if key.startswith("b2.0.")]:
        state_dict["block1." + name[len("b2.0."):]] = state_dict[name]
    return state_dict


def write_random_checkpoint(path, config: ModelConfig = VIT_B, seed: int = 0,
                            wrapper: str = "", dataparallel: bool = False,
                            residual_scale: float = 1.0) -> Path:
    """Save a random upstream-format checkpoint; ``wrapper`` 'model' or 'state_dict' nests it."""
    state_dict = random_state_dict(config, seed, residual_scale)
    if dataparallel:
        state_dict = {"module." + key: value for key, value in state_dict.items()}
    payload = {wrapper: state_dict} if wrapper else state_dict
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as partial:
        torch.save(payload, partial)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a random KeyRe-ID checkpoint in the upstream format (for demos and "
                    "tests: its embeddings mean nothing).")
    parser.add_argument("output", type=Path, help="where to write the .pth file")
    parser.add_argument("--reduced", action="store_true",
                        help=f"a narrow model (width {REDUCED.embed_dim}, {REDUCED.depth} blocks) "
                             "with the same structure: fast, for smoke tests")
    parser.add_argument("--cameras", type=int, default=6, help="number of cameras (MARS: 6)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    if args.cameras < 1:
        raise KeyreidError(f"--cameras must be at least 1, got {args.cameras}")
    check_writable(args.output, "output")
    base = REDUCED if args.reduced else VIT_B
    config = ModelConfig(embed_dim=base.embed_dim, depth=base.depth, num_cameras=args.cameras,
                         num_identities=base.num_identities)
    path = write_random_checkpoint(args.output, config, seed=args.seed)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB, random weights, "
          f"width {config.embed_dim}, {config.num_cameras} cameras)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
