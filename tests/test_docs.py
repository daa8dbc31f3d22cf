"""The documentation stands alone inside the repository and cannot drift from the code.

- No text file points outside the repository for the contract (the old external spec file).
- Every "docs/contract.md §N" the code or docs cite is a section of docs/contract.md, and every
  link to one of its headings resolves.
- The numbers docs/contract.md states are the ones the code defines: each is formatted here from
  the constant it describes and looked up in the text, so changing either alone fails.
"""
import dataclasses
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from keyreid import contract
from keyreid.export import config as model_config
from keyreid.export.reference_model import TCSS_SHIFT
from keyreid.int8_targets import INT16_MAX, RECIPES, recipe_metadata
from keyreid.kernels import body_parts
from keyreid.kernels.onnx_function import FUNCTION_ATTRIBUTES
from keyreid.plan_sidecar import BATCH_KEYS, FORMAT, FORMAT_VERSION, PlanSidecar
from keyreid.runtime import evaluation, mars, poses
from keyreid.runtime.tracklets import split_into_clips
from keyreid.tolerances import TOLERANCES

REPO = Path(__file__).resolve().parents[1]
CONTRACT = REPO / "docs" / "contract.md"
TEXT_SUFFIXES = (".py", ".md", ".toml", ".cfg", ".ini")
# Spelled in pieces so that this file does not match itself.
FORBIDDEN = ("SPEC" + ".md", ".." + "/shared", "SPEC" + " section", "SPEC" + " §")
# "docs/contract.md §3", "contract.md §2, §3, §6", "docs/contract.md section 6", "... sections 2-3"
CITATION = re.compile(r"(?:docs/)?contract\.md\s*(§\s*\d+(?:\s*(?:,|-|and)\s*§?\s*\d+)*"
                      r"|sections?\s+\d+(?:\s*(?:,|-|and)\s*\d+)*)")
LINK = re.compile(r"\(((?:\.\./)?(?:docs/)?contract\.md)#([^)\s]+)\)")


def repository_files():
    """Text files of the repository: what git tracks plus new files it does not ignore; without
    git, every file outside .git and ignored build folders."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
        paths = [REPO / name for name in listed]
    except (OSError, subprocess.SubprocessError):
        skipped = {".git", "__pycache__", "build", "dist", ".pytest_cache", ".benchmarks", "demo"}
        paths = []
        for root, folders, files in os.walk(REPO):
            folders[:] = [name for name in folders if name not in skipped and not name.endswith(".egg-info")
                          and not (Path(root) / name / "pyvenv.cfg").exists()]
            paths += [Path(root) / name for name in files]
    return sorted(path for path in paths if path.suffix in TEXT_SUFFIXES and path.is_file())


def flat(text: str) -> str:
    """Whitespace runs as one space and the typographic minus as '-', for phrase lookups."""
    return re.sub(r"\s+", " ", text.replace("\u2212", "-"))


def sci(value: float) -> str:
    """1e-06 -> '1e-6', as the document writes small constants."""
    return re.sub(r"e-0*(\d)", r"e-\1", f"{value:.0e}")


def sections() -> dict:
    """{number: section text} of docs/contract.md, from its '## §N Title' headings."""
    parts = re.split(r"^## §(\d+) ", CONTRACT.read_text(encoding="utf-8"), flags=re.M)
    return {int(number): body for number, body in zip(parts[1::2], parts[2::2])}


def section(number: int) -> str:
    return flat(sections()[number])


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces as '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# --- standing alone -----------------------------------------------------------------------------

def test_no_text_file_points_outside_the_repository_for_the_contract():
    offenders = [f"{path.relative_to(REPO)}: {phrase!r}" for path in repository_files()
                 for phrase in FORBIDDEN if phrase in path.read_text(encoding="utf-8", errors="replace")]
    assert offenders == []


def test_the_file_scan_sees_code_and_docs():
    names = {str(path.relative_to(REPO)) for path in repository_files()}
    assert {"README.md", "docs/contract.md", "docs/architecture.md", "keyreid/contract.py",
            "pyproject.toml", "pytest.ini"} <= names


def test_sections_are_numbered_one_to_eight():
    assert sorted(sections()) == list(range(1, 9))


def test_every_cited_section_exists():
    existing = set(sections())
    cited = {}
    for path in repository_files():
        for match in CITATION.finditer(path.read_text(encoding="utf-8", errors="replace")):
            for number in map(int, re.findall(r"\d+", match.group(1))):
                cited.setdefault(number, []).append(str(path.relative_to(REPO)))
    assert len(cited) >= 6, "the code is expected to cite most sections"
    assert {number: files for number, files in cited.items() if number not in existing} == {}


def test_the_citation_pattern_reads_every_form_the_code_uses():
    found = [re.findall(r"\d+", match.group(1)) for match in CITATION.finditer(
        "(docs/contract.md §3) docs/contract.md\n§2, §3, §6 (docs/contract.md section 6) "
        "docs/contract.md sections 2-3 (contract.md §8)")]
    assert found == [["3"], ["2", "3", "6"], ["6"], ["2", "3"], ["8"]]


def test_links_to_contract_headings_resolve():
    anchors = {github_anchor(line[3:]) for line in CONTRACT.read_text(encoding="utf-8").splitlines()
               if line.startswith("## ")}
    broken = [f"{path.relative_to(REPO)}: #{anchor}" for path in repository_files()
              for _, anchor in LINK.findall(path.read_text(encoding="utf-8", errors="replace"))
              if anchor not in anchors]
    assert broken == []


def test_readme_links_the_documentation():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "](docs/contract.md)" in readme and "](docs/architecture.md)" in readme


# --- the numbers --------------------------------------------------------------------------------

def test_clip_image_and_token_geometry():
    text = flat(CONTRACT.read_text(encoding="utf-8"))
    assert f"T = {contract.CLIP_FRAMES} frames per clip" in text
    assert f"resized to {contract.IMAGE_HEIGHT}×{contract.IMAGE_WIDTH} (height × width)" in section(2)
    assert (f"{contract.PATCH_SIZE}×{contract.PATCH_SIZE} patch convolution gives {contract.NUM_PATCHES} tokens "
            f"in raster order ({contract.PATCH_ROWS} rows × {contract.PATCH_COLS} columns)") in section(2)
    assert f"position embedding: {contract.NUM_TOKENS} tokens" in section(1)
    assert f"Heads are {model_config.BACKBONE_HEAD_DIM} wide in the backbone" in section(1)


def test_embedding_length_formula():
    units = 1 + contract.NUM_PARTS * contract.CLIP_FRAMES
    assert contract.embedding_dim(768) == units * 768
    assert (f"D + {contract.NUM_PARTS}·T·D = {units}·D floats, {contract.embedding_dim(768)} for ViT-B"
            in section(2))
    assert f"[N, {units}·D] = [N, {contract.embedding_dim(768)}] for ViT-B" in section(6)


def test_model_constants():
    text = section(1) + section(2)
    assert f"pos_embed + {model_config.CAMERA_EMBED_SCALE} · Cam[camera]" in text
    assert f"D → {model_config.ATTENTION_POOL_DIM})" in text
    assert f"Shift by {TCSS_SHIFT}: rows `R[{TCSS_SHIFT}:{contract.NUM_TOKENS}]` followed by `R[1:{TCSS_SHIFT}]`" in text
    assert f"LayerNorm eps is {sci(model_config.VIT_NORM_EPS)} inside blocks" in text
    assert f"{sci(model_config.PART_NORM_EPS)} in `b2.1`" in text
    assert f"BatchNorms use eps {sci(model_config.BATCHNORM_EPS)}" in text
    assert f"MLP is {model_config.VIT_B.mlp_ratio}× wide" in text


def test_part_weight_op_numbers():
    text = section(3)
    for name, group in zip(contract.PART_NAMES, body_parts.JOINT_GROUPS):
        assert f"{name.replace('_', ' ')} {{{', '.join(map(str, group))}}}" in text
    assert f"{contract.NUM_KEYPOINTS} COCO keypoints" in text
    assert f"confidence is > {body_parts.CONFIDENCE_THRESHOLD}, strictly" in text
    assert (f"Radius r = int({body_parts.RENDER_WIDTH} / {body_parts.G_SCALE}) = {body_parts.KERNEL_RADIUS}, "
            f"window 2r + 1 = {body_parts.KERNEL_SIZE}") in text
    assert f"σ = {body_parts.KERNEL_SIZE}/4 = {body_parts.KERNEL_SIGMA}" in text
    assert f"(x - min) / (max - min + {sci(body_parts.MINMAX_EPS)})" in text
    assert f"[0, {body_parts.RENDER_WIDTH}) × [0, {body_parts.RENDER_HEIGHT})" in text
    assert f"over {poses.MAX_POSE_BYTES // 1024} KiB" in text
    assert f"(`{'`, `'.join(contract.HEATMAP_MODES)}`; default `{contract.DEFAULT_HEATMAP_MODE}`)" in text


def test_tracklet_and_evaluation_numbers():
    text = section(4)
    assert f"consecutive groups of {contract.CLIP_FRAMES}" in text
    examples = {6: "[0, 1, 2, 3], [4, 5, 4, 5]", 3: "[0, 1, 2, 0]", 1: "[0, 0, 0, 0]"}
    for frames, shown in examples.items():
        assert ", ".join(map(str, split_into_clips(frames))) == shown
        assert shown in text
    assert (f"At most the first {contract.MAX_CLIPS_PER_TRACKLET} clips are used "
            f"({contract.MAX_CLIPS_PER_TRACKLET * contract.CLIP_FRAMES} frames)") in text
    assert len(split_into_clips(10_000)) == contract.MAX_CLIPS_PER_TRACKLET
    assert f"Camera {contract.MEAN_CAMERA} asks for the mean camera embedding" in text
    assert f"at {', '.join(map(str, evaluation.DEFAULT_RANKS))} by default" in text
    assert f"camera 1 … {mars.NUM_CAMERAS}" in text and f"Rows with pid {mars.JUNK_PID} are junk" in text


def test_io_table_matches_the_contract_specs():
    table = [line for line in CONTRACT.read_text(encoding="utf-8").splitlines()
             if line.startswith(("| in `", "| out `"))]
    by_name = {line.split("`")[1]: flat(line) for line in table}
    assert list(by_name) == list(contract.INPUT_NAMES + contract.OUTPUT_NAMES)
    for spec in contract.INPUTS + contract.output_specs(768):
        row = by_name[spec.name]
        assert f"| {spec.dtype.name} |" in row
        if spec.name != "embedding":
            assert f"[{', '.join(map(str, spec.shape))}]" in row
    assert f"camera 0 … C-1, or {contract.MEAN_CAMERA} for the mean camera embedding" in by_name["camera"]


def test_op_node_attributes():
    text = section(6)
    assert f"`{contract.OP_NAME}` in domain `{contract.OP_DOMAIN}`" in text
    assert f'`plugin_namespace="{contract.OP_DOMAIN}"` and `plugin_version="{contract.OP_PLUGIN_VERSION}"`' in text
    assert all(f"`{attribute}" in text for attribute in FUNCTION_ATTRIBUTES)
    assert f"({contract.ONNX_OPSET} or newer)" in text


def test_metadata_keys_are_the_ones_the_export_stamps():
    onnx = pytest.importorskip("onnx")
    from keyreid.export.onnx_export import stamp_metadata

    checkpoint = SimpleNamespace(config=model_config.VIT_B, sha256="0" * 64, path=Path("ckpt.pth"))
    model = onnx.ModelProto()
    stamp_metadata(model, checkpoint, "max", "int8", contract.ONNX_OPSET, int8_target="avx2")
    stamped = {entry.key for entry in model.metadata_props}
    assert set(recipe_metadata("avx2")) <= stamped
    text = section(7)
    assert [key for key in sorted(stamped) if f"`{key}`" not in text] == []
    sidecar_keys = [field.name for field in dataclasses.fields(PlanSidecar)] + list(BATCH_KEYS)
    assert [key for key in sidecar_keys if f"`{key}`" not in text] == []
    assert f"`format` = `{FORMAT}`, `format_version` = {FORMAT_VERSION}" in text


def test_int8_targets_and_tolerances():
    text = section(8)
    assert f"(limit {INT16_MAX})" in text
    for target, recipe in RECIPES.items():
        assert (f"| `{target}` | 0 … {recipe.activation_max} ({recipe.activation_bits} bits) | "
                f"±{recipe.weight_max} | {2 * recipe.activation_max * recipe.weight_max} |") in text
    table = {line.split("`")[1]: flat(line) for line in CONTRACT.read_text(encoding="utf-8").splitlines()
             if line.startswith("| `") and "|" in line[3:] and line.split("`")[1] in TOLERANCES}
    assert set(table) == set(TOLERANCES)
    for row, bounds in TOLERANCES.items():
        embedding, part_weights = bounds["embedding"], bounds["part_weights"]
        expected = (f"relative error ≤ {sci(embedding.max_rel)}" if embedding.max_rel is not None
                    else f"cosine ≥ {embedding.min_cosine}")
        assert expected in table[row] and table[row].endswith(f"| {sci(part_weights.max_abs)} |")
