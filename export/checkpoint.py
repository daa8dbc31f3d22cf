"""Read an upstream KeyRe-ID checkpoint (docs/contract.md §1) into a state dict the reference model
loads strictly, and its ModelConfig.

A checkpoint is untrusted input: it is unpickled with ``weights_only=True`` and every failure
becomes one KeyreidError sentence naming the file and the problem.
"""
import hashlib
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from keyreid.contract import NUM_TOKENS, PATCH_SIZE
from keyreid.errors import KeyreidError
from keyreid.export.config import ModelConfig
from keyreid.lazy import require

# Keys upstream saves that inference never reads (docs/contract.md §1). ``block1`` is the same
# module as ``b2.0``, saved twice under two names.
UNUSED_KEY_PATTERNS = (
    r"base\.norm\..*", r"base\.fc\..*", r"classifier(_\d)?\.weight", r"block1\..*",
)
# Keys whose presence identifies KeyRe-ID rather than another ViT re-id model.
SIGNATURE_KEYS = ("base.cls_token", "base.pos_embed", "base.patch_embed.proj.weight", "b1.0.norm1.weight",
                  "b2.0.attn.qkv.weight", "bottleneck_1.running_mean", "attention_tconv.weight")


@dataclass
class Checkpoint:
    path: Path
    state_dict: Dict[str, "object"]   # only the tensors inference uses, upstream names
    config: ModelConfig
    sha256: str


def _fail(path, problem: str):
    raise KeyreidError(f"{path}: {problem}")


def read_raw(path: Path) -> dict:
    """torch.load with weights_only=True, every failure mapped to one sentence."""
    torch = require("torch")
    if not path.exists():
        _fail(path, "no such file")
    if path.is_dir():
        _fail(path, "is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(2)
    except OSError as exc:
        _fail(path, f"cannot be read: {exc.strerror or exc}")
    if magic not in (b"PK", b"\x80\x02"):    # torch.save's zip archive, or its legacy pickle
        _fail(path, "is not a PyTorch checkpoint (neither torch.save's zip format nor a readable pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "Unsupported global" in message:     # a pickled class or function, not garbage
            _fail(path, "holds Python objects besides tensors; refusing to unpickle it "
                        "(checkpoints load with weights_only=True). Save model.state_dict() instead")
        _fail(path, "is not a PyTorch checkpoint (neither torch.save's zip format nor a readable pickle)")
    except Exception as exc:  # the unpickler raises anything on garbage bytes
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _fail(path, f"is not a readable PyTorch checkpoint (truncated or another format?): "
                    f"{first_line}")
    if not isinstance(obj, dict):
        _fail(path, f"holds a {type(obj).__name__}, not a state dict")
    return obj


def unwrap(raw: dict, path) -> Dict[str, "object"]:
    """Accept sd, {'model': sd}, {'state_dict': sd} and DataParallel's ``module.`` prefix."""
    torch = require("torch")
    state_dict = raw
    for wrapper in ("model", "state_dict"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    tensors = {key: value for key, value in state_dict.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        _fail(path, "contains no tensors: not a model state dict")
    if all(key.startswith("module.") for key in tensors):
        tensors = {key[len("module."):]: value for key, value in tensors.items()}
    return tensors


def _few(keys: List[str], limit: int = 4) -> str:
    listed = ", ".join(keys[:limit])
    return listed + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def infer_config(state_dict: Dict[str, "object"], path) -> ModelConfig:
    """Dimensions from shapes; refuse checkpoints of another architecture with the reason."""
    missing = [key for key in SIGNATURE_KEYS if key not in state_dict]
    if len(missing) == len(SIGNATURE_KEYS):
        _fail(path, f"is not a KeyRe-ID checkpoint: none of its keys look like KeyRe-ID's "
                    f"(expected e.g. {_few(list(SIGNATURE_KEYS), 3)}; found {_few(sorted(state_dict), 3)})")
    if missing:
        _fail(path, f"is not a KeyRe-ID checkpoint (another re-id architecture?): missing "
                    f"{_few(missing)}")
    embed_dim = state_dict["base.cls_token"].shape[-1]
    pos_tokens = state_dict["base.pos_embed"].shape[1]
    if pos_tokens != NUM_TOKENS:
        _fail(path, f"was trained for another input size: base.pos_embed has {pos_tokens} tokens, "
                    f"KeyRe-ID at 256x128 with 16x16 patches has {NUM_TOKENS}")
    patch_shape = tuple(state_dict["base.patch_embed.proj.weight"].shape)
    if patch_shape != (embed_dim, 3, PATCH_SIZE, PATCH_SIZE):
        _fail(path, f"base.patch_embed.proj.weight has shape {list(patch_shape)}, expected "
                    f"[{embed_dim}, 3, {PATCH_SIZE}, {PATCH_SIZE}] (another patch size?)")
    if embed_dim % 64:
        _fail(path, f"backbone width {embed_dim} is not a multiple of the 64-wide ViT heads")
    if "base.Cam" not in state_dict:
        _fail(path, "has no camera embedding base.Cam (trained without camera information?)")
    if state_dict["base.Cam"].ndim != 3 or state_dict["base.Cam"].shape[0] < 1:
        _fail(path, f"camera embedding base.Cam has shape {list(state_dict['base.Cam'].shape)}: "
                    "the model needs at least one camera ([C, 1, width], C >= 1)")
    block_ids = {int(match.group(1)) for key in state_dict
                 if (match := re.match(r"base\.blocks\.(\d+)\.", key))}
    if len(block_ids) < 2:
        _fail(path, "has fewer than two backbone blocks base.blocks.*")
    identities = state_dict["classifier.weight"].shape[0] if "classifier.weight" in state_dict else 0
    return ModelConfig(embed_dim=embed_dim, depth=max(block_ids) + 1,
                       num_cameras=state_dict["base.Cam"].shape[0], num_identities=identities)


def checkpoint_filter_fn(state_dict: Dict[str, "object"], config: ModelConfig) -> Dict[str, "object"]:
    """Drop what inference never reads: the last backbone block, base.norm, base.fc, the
    classifiers and the duplicate ``block1``. What remains must match the model exactly."""
    last_block = f"base.blocks.{config.depth - 1}."
    return {key: value for key, value in state_dict.items()
            if not key.startswith(last_block)
            and not any(re.fullmatch(pattern, key) for pattern in UNUSED_KEY_PATTERNS)}


def check_against_model(state_dict: Dict[str, "object"], expected: Dict[str, "object"], path) -> None:
    """Every tensor the model needs is there with its shape, and nothing unexplained is left."""
    missing = [key for key in expected if key not in state_dict]
    if missing:
        _fail(path, f"is missing {len(missing)} tensor(s) the model needs: {_few(missing)}")
    unexpected = [key for key in state_dict if key not in expected]
    if unexpected:
        _fail(path, f"has {len(unexpected)} tensor(s) KeyRe-ID does not have (another "
                    f"architecture?): {_few(unexpected)}")
    for key, target in expected.items():
        if tuple(state_dict[key].shape) != tuple(target.shape):
            _fail(path, f"tensor {key} has shape {list(state_dict[key].shape)}, expected "
                        f"{list(target.shape)} for a model of width {target_width(expected)}")


def target_width(expected: Dict[str, "object"]) -> int:
    return expected["base.cls_token"].shape[-1]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(path) -> Checkpoint:
    """Read, unwrap, size and check a checkpoint. Raises KeyreidError on any bad file."""
    torch = require("torch")
    from keyreid.export.reference_model import KeyReIDReference

    path = Path(path)
    state_dict = unwrap(read_raw(path), path)
    config = infer_config(state_dict, path)
    state_dict = checkpoint_filter_fn(state_dict, config)
    with torch.device("meta"):
        expected = KeyReIDReference(config).state_dict()
    check_against_model(state_dict, expected, path)
    for key, value in state_dict.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            _fail(path, f"tensor {key} contains NaN or infinite values")
    return Checkpoint(path=path, state_dict=state_dict, config=config, sha256=sha256_of(path))


def load_reference_model(checkpoint) -> "object":
    """KeyReIDReference with the checkpoint's weights, loaded strictly, in eval mode."""
    from keyreid.export.reference_model import KeyReIDReference

    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load_checkpoint(checkpoint)
    model = KeyReIDReference(checkpoint.config)
    model.load_state_dict(checkpoint.state_dict, strict=True)
    return model.eval()
