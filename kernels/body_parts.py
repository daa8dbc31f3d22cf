"""The numbers of the KeypointPartPool op (docs/contract.md §3), in one place.

Every implementation (NumPy reference, torch, ONNX function, CUDA plugin) reads these names, so
a change to the heatmap recipe is made once. We render in the 256x128 model frame, so the kernel
size follows from the model width, not from the crop.
"""
import numpy as np

from keyreid.contract import CONFIDENCE_THRESHOLD, IMAGE_HEIGHT, IMAGE_WIDTH, JOINT_GROUPS, NUM_PARTS, PART_NAMES

assert len(JOINT_GROUPS) == NUM_PARTS == len(PART_NAMES)
MAX_JOINTS_PER_GROUP = max(len(group) for group in JOINT_GROUPS)   # 5

# Each group padded to MAX_JOINTS_PER_GROUP slots by repeating its last joint, so one batched
# matmul serves all groups; SLOT_IS_JOINT masks the repeats out.
GROUP_SLOTS = tuple(group + (group[-1],) * (MAX_JOINTS_PER_GROUP - len(group))
                    for group in JOINT_GROUPS)

# SLOT_IS_JOINT[p, k] = 1 for a real joint, 0 for a padding repeat (which must not count twice).
SLOT_IS_JOINT = np.array([[1.0] * len(group) + [0.0] * (MAX_JOINTS_PER_GROUP - len(group))
                          for group in JOINT_GROUPS], dtype=np.float32)

# A joint counts iff confidence > CONFIDENCE_THRESHOLD (0.1), strictly. Upstream compares a
# float32 confidence with the Python float 0.1 in float64 (NumPy 1.x scalar promotion). For float32
# confidences that is the same as conf >= float32(0.1), since float32(0.1) is the first float32
# above 0.1; float32-only backends (torch, ONNX) use that form.
MIN_VISIBLE_CONFIDENCE_F32 = np.float32(CONFIDENCE_THRESHOLD)

# Render frame and Gaussian window: radius r = int(w_render / g_scale), window 2r + 1,
# g(n) = exp(-1/2 (n / sigma)^2) with sigma = (2r + 1) / 4 (scipy's gaussian(M, std=M/4)).
G_SCALE = 11
RENDER_WIDTH = IMAGE_WIDTH       # 128
RENDER_HEIGHT = IMAGE_HEIGHT     # 256
KERNEL_RADIUS = int(RENDER_WIDTH / G_SCALE)       # 11
KERNEL_SIZE = 2 * KERNEL_RADIUS + 1               # 23
KERNEL_SIGMA = KERNEL_SIZE / 4                    # 5.75

# The loader's min-max scaling: (x - min) / (max - min + MINMAX_EPS).
MINMAX_EPS = 1e-6
