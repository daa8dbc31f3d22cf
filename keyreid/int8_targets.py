"""Which int8 codes a CPU class multiplies exactly, and what a file made for another one means.

ONNX Runtime's int8 products multiply u8 activation codes (0..255) by s8 weight codes
(-127..127). With VNNI (AVX-512 VNNI, AVX-VNNI) or AMX each product pair goes straight into a
32-bit sum. Without them (AVX2 only) the kernel first adds neighbouring products in a
*saturating 16-bit* register (``vpmaddubsw``): 2 * 255 * 127 = 64770 does not fit in 32767, so
sums clip and the embedding drifts (measured: cosine 0.9989 on an AVX2-only EPYC where VNNI
gives 0.9997). A pair stays exact when 2 * largest activation code * largest weight code
<= 32767. Halving either grid gets there; measured on ViT-B, halving the weights costs ~4x the
int8 error while halving the activations costs almost nothing (benchmarks/RESULTS.md section 7).

So an int8 file is made for a *target CPU class*, written into its metadata:

- ``avx2``: activations on 0..127 (export/narrow_activations.py), 8-bit weights: 2 * 127 * 127
  = 32258, exact on every x86 CPU, at the AVX2 kernels' full speed.
- ``vnni`` and ``amx``: full 8-bit activations and weights, exact where sums are 32-bit.

On a CPU without VNNI, the ONNX Runtime backend runs a file whose codes could saturate with the
session option ``session.x64quantprecision``: ONNX Runtime then moves its weights to the slower
but exact u8 x u8 kernel. The file stays correct there, only slower, and the user is told once
(:func:`int8_cpu_mismatch`). The option is *not* set for saturation-free files: it would move
their 8-bit weights to the slow kernel for nothing.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

from keyreid.cpu_features import CpuIsa
from keyreid.model_metadata import ModelMetadata

INT16_MAX = 32767
FULL_ACTIVATION_MAX = 255
NARROW_ACTIVATION_MAX = 127
WEIGHT_MAX = 127            # symmetric per-channel s8 weights, as ONNX Runtime quantises them


@dataclass(frozen=True)
class Int8Recipe:
    """How an int8 file for one CPU class codes its products."""
    target: str
    activation_max: int     # largest u8 activation code
    weight_max: int         # largest |s8 weight code|

    @property
    def activation_bits(self) -> int:
        return self.activation_max.bit_length()

    @property
    def saturation_free(self) -> bool:
        """No pair of products can clip a signed 16-bit sum (AVX2 kernels without VNNI)."""
        return 2 * self.activation_max * self.weight_max <= INT16_MAX


RECIPES = {
    "avx2": Int8Recipe("avx2", NARROW_ACTIVATION_MAX, WEIGHT_MAX),
    "vnni": Int8Recipe("vnni", FULL_ACTIVATION_MAX, WEIGHT_MAX),
    "amx": Int8Recipe("amx", FULL_ACTIVATION_MAX, WEIGHT_MAX),
}
TARGET_CPUS: Tuple[str, ...] = tuple(RECIPES)

# metadata_props keys of an int8 file
TARGET_KEY = "int8_target_cpu"
ACTIVATION_BITS_KEY = "int8_activation_bits"


def target_for(isa: CpuIsa) -> str:
    """The int8 target that suits this CPU (``--target-cpu auto``)."""
    return isa.cpu_class if isa.cpu_class in RECIPES else "avx2"    # baseline: the safe one


def check_target(target: str) -> str:
    if target not in RECIPES:
        raise ValueError(f"unknown int8 target CPU {target!r}: choose one of {', '.join(TARGET_CPUS)}")
    return target


def recipe_metadata(target: str) -> dict:
    """The ``ModelMetadata`` fields an int8 file made for ``target`` carries."""
    recipe = RECIPES[check_target(target)]
    return {TARGET_KEY: recipe.target, ACTIVATION_BITS_KEY: recipe.activation_bits}


def file_recipe(metadata: ModelMetadata) -> Optional[Int8Recipe]:
    """The recipe an int8 file was made with (None for other precisions). An int8 file with no
    target (OpenVINO's NNCF IR records ``vnni``) has full 8-bit codes, like ``vnni``."""
    if metadata.precision != "int8":
        return None
    target = metadata.int8_target_cpu
    return RECIPES[target] if target in RECIPES else RECIPES["vnni"]


def needs_exact_u8u8_path(recipe: Optional[Int8Recipe], isa: CpuIsa) -> bool:
    """True when ONNX Runtime must run this file's products on its exact u8 x u8 kernel here."""
    return recipe is not None and not recipe.saturation_free and not isa.vnni


def int8_cpu_mismatch(metadata: ModelMetadata, isa: CpuIsa, source: object,
                      exact_path: bool = True) -> Optional[str]:
    """A sentence for the user when an int8 file meets a CPU its recipe does not suit, else None.

    ``exact_path``: the backend can keep saturating codes exact (ONNX Runtime's u8 x u8 kernel);
    OpenVINO cannot, so an int8 IR (full 8-bit codes, made by NNCF) on such a CPU loses accuracy.
    """
    recipe = file_recipe(metadata)
    if recipe is None:
        return None
    made_for = (f"made for {metadata.int8_target_cpu} CPUs" if metadata.int8_target_cpu
                else "made with 8-bit codes")
    here = f"this CPU is class {isa.cpu_class}"
    if needs_exact_u8u8_path(recipe, isa) and not exact_path:
        return (f"{source}: this int8 file was {made_for}, and {here} (no VNNI): its 8-bit products can "
                "saturate the 16-bit sums of the AVX2 kernels, which lowers its accuracy here (reduced "
                "model under AVX2 emulation: cosine 0.99994 -> 0.99965). On this CPU use an ONNX Runtime "
                "int8 file exported with --target-cpu avx2, or the fp32 file")
    if needs_exact_u8u8_path(recipe, isa):
        return (f"{source}: this int8 file was {made_for}, and {here} (no VNNI): its 8-bit products "
                "would saturate the 16-bit sums of the AVX2 kernels, so ONNX Runtime runs them on its "
                "exact but slower u8 x u8 path. For full speed here, export with --target-cpu avx2")
    if recipe.saturation_free and isa.vnni:
        return (f"{source}: this int8 file was {made_for} (7-bit activations, coarser than needed), and "
                f"{here}: export with --target-cpu {target_for(isa)} for a more accurate file at the same speed")
    return None
