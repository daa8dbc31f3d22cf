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
from keyreid.runtime.results import evaluation
from keyreid.runtime.inputs import mars, poses, track_formats
from keyreid.runtime.inputs.tracklets import split_into_clips
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


def test_sections_are_numbered_one_to_nine():
    assert sorted(sections()) == list(range(1, 10))


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
    linked = set(MARKDOWN_LINK.findall(readme))
    pages = {f"docs/{path.name}" for path in (REPO / "docs").glob("*.md")}
    assert pages <= linked, f"pages the README does not link: {sorted(pages - linked)}"


# --- the documents stand alone --------------------------------------------------------------------

MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
# Places outside the repository a document could name: absolute folders of a machine, a home.
FOREIGN_PATH = re.compile(r"(?<![\w.$])(?:/(?:work|tmp|root|home|usr|etc|opt|mnt)/|~/)")


def documents():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "RESULTS.md"]


def heading_anchors(path: Path) -> set:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {github_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_every_link_between_documents_resolves_inside_the_repository():
    broken = []
    for document in documents():
        for target in MARKDOWN_LINK.findall(document.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            name, _, anchor = target.partition("#")
            linked = (document.parent / name).resolve() if name else document
            inside = linked == REPO or REPO in linked.parents
            if not inside or not linked.exists() or (anchor and linked.suffix == ".md"
                                                     and anchor not in heading_anchors(linked)):
                broken.append(f"{document.relative_to(REPO)}: {target}")
    assert broken == []


def test_no_document_names_a_path_outside_the_repository():
    found = [f"{document.relative_to(REPO)}: {match.group(0)}" for document in documents()
             for match in FOREIGN_PATH.finditer(document.read_text(encoding="utf-8"))]
    assert found == []


def test_the_link_and_path_checks_see_what_they_look_for():
    assert MARKDOWN_LINK.findall("see [a](docs/usage.md#x) and [b](../y.md)") == ["docs/usage.md#x", "../y.md"]
    assert [m.group(0) for m in FOREIGN_PATH.finditer("in /work/notes, ~/.cache, $PWD/models:/models")] == \
        ["/work/", "~/"]


# --- the numbers --------------------------------------------------------------------------------

UNITS = 1 + contract.NUM_PARTS * contract.CLIP_FRAMES     # embedding length over model width
# (section, phrase): each phrase is formatted from the constants it states.
PHRASES = [
    (2, f"T = {contract.CLIP_FRAMES} frames of one person"),
    (2, f"resized to {contract.IMAGE_HEIGHT}×{contract.IMAGE_WIDTH} (height × width)"),
    (2, f"{contract.PATCH_SIZE}×{contract.PATCH_SIZE} patch convolution gives {contract.NUM_PATCHES} tokens in "
        f"raster order ({contract.PATCH_ROWS} rows × {contract.PATCH_COLS} columns)"),
    (1, f"position embedding: {contract.NUM_TOKENS} tokens"),
    (1, f"Heads are {model_config.BACKBONE_HEAD_DIM} wide in the backbone"),
    (1, f"MLP is {model_config.VIT_B.mlp_ratio}× wide"),
    (1, f"LayerNorm eps is {sci(model_config.VIT_NORM_EPS)} inside blocks"),
    (1, f"{sci(model_config.PART_NORM_EPS)} in `b2.1`"),
    (1, f"BatchNorms use eps {sci(model_config.BATCHNORM_EPS)}"),
    (2, f"pos_embed + {model_config.CAMERA_EMBED_SCALE} · Cam[camera]"),
    (2, f"D → {model_config.ATTENTION_POOL_DIM})"),
    (2, f"Shift by {TCSS_SHIFT}: rows `R[{TCSS_SHIFT}:{contract.NUM_TOKENS}]` followed by `R[1:{TCSS_SHIFT}]`"),
    (2, f"D + {contract.NUM_PARTS}·T·D = {UNITS}·D floats, {contract.embedding_dim(768)} for ViT-B"),
    (6, f"[N, {UNITS}·D] = [N, {contract.embedding_dim(768)}] for ViT-B"),
    (3, f"{contract.NUM_KEYPOINTS} COCO keypoints"),
    *((3, f"{name.replace('_', ' ')} {{{', '.join(map(str, group))}}}")
      for name, group in zip(contract.PART_NAMES, body_parts.JOINT_GROUPS)),
    (3, f"confidence is > {body_parts.CONFIDENCE_THRESHOLD}, strictly"),
    (3, f"Radius r = int({body_parts.RENDER_WIDTH} / {body_parts.G_SCALE}) = {body_parts.KERNEL_RADIUS}, "
        f"window 2r + 1 = {body_parts.KERNEL_SIZE}"),
    (3, f"σ = {body_parts.KERNEL_SIZE}/4 = {body_parts.KERNEL_SIGMA}"),
    (3, f"(x - min) / (max - min + {sci(body_parts.MINMAX_EPS)})"),
    (3, f"[0, {body_parts.RENDER_WIDTH}) × [0, {body_parts.RENDER_HEIGHT})"),
    (3, f"over {poses.MAX_POSE_BYTES // 1024} KiB"),
    (3, f"(`{'`, `'.join(contract.HEATMAP_MODES)}`; default `{contract.DEFAULT_HEATMAP_MODE}`)"),
    (4, f"consecutive groups of {contract.CLIP_FRAMES}"),
    (4, f"At most the first {contract.MAX_CLIPS_PER_TRACKLET} clips are used "
        f"({contract.MAX_CLIPS_PER_TRACKLET * contract.CLIP_FRAMES} frames)"),
    (4, f"Camera {contract.MEAN_CAMERA} asks for the mean camera embedding"),
    (4, f"at {', '.join(map(str, evaluation.DEFAULT_RANKS))} by default"),
    (4, f"camera 1 … {mars.NUM_CAMERAS}"),
    (4, f"Rows with pid {mars.JUNK_PID} are junk"),
    (6, f"`{contract.OP_NAME}` in domain `{contract.OP_DOMAIN}`"),
    (6, f'`plugin_namespace="{contract.OP_DOMAIN}"` and `plugin_version="{contract.OP_PLUGIN_VERSION}"`'),
    *((6, f"`{attribute}") for attribute in FUNCTION_ATTRIBUTES),
    (6, f"({contract.ONNX_OPSET} or newer)"),
    (7, f"`format` = `{FORMAT}`, `format_version` = {FORMAT_VERSION}"),
    (8, f"(limit {INT16_MAX})"),
    (9, f"confidence is below {track_formats.ULTRALYTICS_MIN_VISIBLE}"),
    (9, f"({contract.CLIP_FRAMES} frames a clip, at most {contract.MAX_CLIPS_PER_TRACKLET} clips)"),
    *((8, f"| `{target}` | 0 … {recipe.activation_max} ({recipe.activation_bits} bits) | ±{recipe.weight_max} | "
          f"{2 * recipe.activation_max * recipe.weight_max} |") for target, recipe in RECIPES.items()),
]


@pytest.mark.parametrize("number, phrase", PHRASES)
def test_contract_states_the_number_the_code_defines(number, phrase):
    assert phrase in section(number)


def test_embedding_length_is_global_plus_six_parts_of_four_frames():
    assert contract.embedding_dim(768) == UNITS * 768 == 19200


def test_clip_examples_are_what_the_split_gives():
    text = section(4)
    for frames, shown in {6: "[0, 1, 2, 3], [4, 5, 4, 5]", 3: "[0, 1, 2, 0]", 1: "[0, 0, 0, 0]"}.items():
        assert ", ".join(map(str, split_into_clips(frames))) == shown and shown in text
    assert len(split_into_clips(10_000)) == contract.MAX_CLIPS_PER_TRACKLET


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


def test_tolerance_table_is_the_code_table():
    table = {line.split("`")[1]: flat(line) for line in CONTRACT.read_text(encoding="utf-8").splitlines()
             if line.startswith("| `") and "|" in line[3:] and line.split("`")[1] in TOLERANCES}
    assert set(table) == set(TOLERANCES)
    for row, bounds in TOLERANCES.items():
        embedding, part_weights = bounds["embedding"], bounds["part_weights"]
        expected = (f"relative error ≤ {sci(embedding.max_rel)}" if embedding.max_rel is not None
                    else f"cosine ≥ {embedding.min_cosine}")
        assert expected in table[row] and table[row].endswith(f"| {sci(part_weights.max_abs)} |")
