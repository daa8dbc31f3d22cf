// KeypointPartPool arithmetic (docs/contract.md §3) as __host__ __device__ functions.
//
// The same source serves the CUDA kernel (keypoint_part_pool.cu, also built by NVRTC) and a
// host build (keypoint_part_pool_host.cpp, built with g++ in CI), so CI checks the kernel's
// maths against kernels/reference.py on machines without a GPU. No CUDA runtime calls here.
//
// The work of one block, and how its threads share it:
//   block  = one clip and one part (KRP_BLOCKS_PER_CLIP = 6 blocks per clip, no atomics);
//   region = one frame's half patch (8 rows x 16 columns): 256 per frame, 1024 per block;
//   thread = one region in each of the 4 frames (krp_region_of), staggered from frame to frame
//            so that the few regions a joint's window touches in consecutive frames fall to
//            different threads. Untouched regions cost a bounds test; their pixels are all 0.
// The loader transform is affine per (frame, part), so each frame needs only the raw map's
// 128 patch sums, its max and its min; pixels are rendered on the fly from the 23-tap Gaussian
// window and never stored.
//
// The numbers below are those of kernels/body_parts.py and keyreid/contract.py;
// tests/test_cuda_kernel.py fails when the two disagree.
#pragma once

#if defined(__CUDACC__)
#define KRP_HD __host__ __device__ __forceinline__
#else
#define KRP_HD inline
#include <math.h>
#endif

#define KRP_CLIP_FRAMES 4
#define KRP_NUM_KEYPOINTS 17
#define KRP_NUM_PARTS 6
#define KRP_JOINT_SLOTS 5             // the largest group (head) has 5 joints
#define KRP_RENDER_HEIGHT 256
#define KRP_RENDER_WIDTH 128
#define KRP_PATCH_SIZE 16
#define KRP_PATCH_COLS 8              // KRP_RENDER_WIDTH / KRP_PATCH_SIZE
#define KRP_NUM_PATCHES 128
#define KRP_KERNEL_RADIUS 11          // int(128 / 11)
#define KRP_KERNEL_SIZE 23            // 2 * radius + 1
#define KRP_KERNEL_SIGMA 5.75f        // (2 * radius + 1) / 4, exact in float32
#define KRP_MIN_CONFIDENCE 0.1f       // conf > 0.1 in float64 == conf >= float32(0.1)
#define KRP_MINMAX_EPS 1e-6f
// A scaled joint further than this from the frame is outside it in every mode; the bound also
// rejects NaN and inf and keeps the float -> int truncation defined.
#define KRP_FAR_OUTSIDE 1.0e6f

#define KRP_MODE_MAX 0
#define KRP_MODE_MEAN 1
#define KRP_MODE_BLANK 2

// Launch geometry: grid (num_clips * KRP_BLOCKS_PER_CLIP), block (KRP_THREADS_PER_BLOCK), no
// dynamic shared memory. Mirrored by kernels/cuda_build.py for the TensorRT plugin.
#define KRP_BLOCKS_PER_CLIP KRP_NUM_PARTS
#define KRP_REGION_ROWS 8
#define KRP_REGIONS_PER_FRAME (KRP_NUM_PATCHES * KRP_PATCH_SIZE / KRP_REGION_ROWS)   // 256
#define KRP_THREADS_PER_BLOCK KRP_REGIONS_PER_FRAME
// How far a thread's region moves from one frame to the next; odd, about a third of a frame.
#define KRP_FRAME_STAGGER 85
#define KRP_DYNAMIC_SHARED_BYTES 0

// A joint in the 256x128 render frame; `drawn` is 0 for a joint this mode skips.
struct KrpJoint {
    int x, y, drawn;
};

// Per-thread (then per-frame) reduction of the raw map over a region of pixels.
struct KrpStats {
    float sum, max, min;
};

// COCO joint index of slot `slot` of part `part`, or -1 for an unused slot.
KRP_HD int krp_group_joint(int part, int slot) {
    switch (part) {
        case 0: return slot;                                        // head 0..4
        case 1: return slot < 2 ? 5 + slot : (slot < 4 ? 9 + slot : -1);   // torso 5, 6, 11, 12
        default: {
            if (slot >= 2) return -1;
            // left arm 7, 9; right arm 8, 10; left leg 13, 15; right leg 14, 16
            const int first = part < 4 ? part + 5 : part + 9;
            return first + 2 * slot;
        }
    }
}

// Tap n (0 .. 22) of the 1-D Gaussian window g(n - r) = exp(-1/2 ((n - r) / sigma)^2); its
// peak is 1, so the outer product is the "max" kernel. The "mean" kernel's 1 / sum is a
// constant factor that the loader's division by the channel max cancels, so it is left out.
KRP_HD float krp_window_tap(int n) {
    const float offset = (float)(n - KRP_KERNEL_RADIUS) / KRP_KERNEL_SIGMA;
    return expf(-0.5f * offset * offset);
}

// Joint `slot` of `part` in frame `frame` of clip `clip`, scaled into the render frame in
// float32 (multiply, then divide) and truncated toward zero, as kernels/reference.py does.
KRP_HD KrpJoint krp_load_joint(int mode, const float* keypoints, const float* crop_size,
                               long long clip, int frame, int part, int slot) {
    KrpJoint joint = {0, 0, 0};
    const int index = krp_group_joint(part, slot);
    if (mode == KRP_MODE_BLANK || index < 0) return joint;
    const long long frame_index = clip * KRP_CLIP_FRAMES + frame;
    const float* xyc = keypoints + (frame_index * KRP_NUM_KEYPOINTS + index) * 3;
    const float crop_w = crop_size[frame_index * 2];
    const float crop_h = crop_size[frame_index * 2 + 1];
    if (!(xyc[2] >= KRP_MIN_CONFIDENCE)) return joint;             // also rejects NaN
    const float x = (xyc[0] * (float)KRP_RENDER_WIDTH) / crop_w;
    const float y = (xyc[1] * (float)KRP_RENDER_HEIGHT) / crop_h;
    if (!(fabsf(x) <= KRP_FAR_OUTSIDE && fabsf(y) <= KRP_FAR_OUTSIDE)) return joint;
    joint.x = (int)x;
    joint.y = (int)y;
    if (mode == KRP_MODE_MAX) {
        // "max" skips a joint whose pixel is outside the frame; "mean" draws the part of its
        // window that overlaps the frame (none, for a far joint: coverage tests below).
        joint.drawn = joint.x >= 0 && joint.x < KRP_RENDER_WIDTH &&
                      joint.y >= 0 && joint.y < KRP_RENDER_HEIGHT;
    } else {
        joint.drawn = 1;
    }
    return joint;
}

// Region `region` (0 .. 255) of a frame: the top or bottom half of patch region / 2.
KRP_HD int krp_region_top(int region) {
    return (region / 2 / KRP_PATCH_COLS) * KRP_PATCH_SIZE + (region % 2) * KRP_REGION_ROWS;
}

KRP_HD int krp_region_left(int region) {
    return (region / 2 % KRP_PATCH_COLS) * KRP_PATCH_SIZE;
}

// The region thread `thread` renders in frame `frame`; over the block's threads, a permutation
// of the frame's regions.
KRP_HD int krp_region_of(int thread, int frame) {
    return (thread + frame * KRP_FRAME_STAGGER) % KRP_REGIONS_PER_FRAME;
}

// Sum, max and min of the raw group map over an 8x16 region of one frame, rendering each
// pixel from the group's joints (`joints`: KRP_JOINT_SLOTS of that frame) and the window taps
// (`window`: KRP_KERNEL_SIZE floats). "max": per pixel the max over joints of g_y * g_x;
// "mean": the sum over covering joints divided by their number, 0 where none covers.
KRP_HD KrpStats krp_region_stats(int mode, const KrpJoint* joints, const float* window, int region) {
    const int top = krp_region_top(region);
    const int left = krp_region_left(region);
    unsigned touching = 0;          // joints whose window overlaps this region
    for (int k = 0; k < KRP_JOINT_SLOTS; ++k) {
        const KrpJoint j = joints[k];
        if (j.drawn && j.y + KRP_KERNEL_RADIUS >= top &&
            j.y - KRP_KERNEL_RADIUS < top + KRP_REGION_ROWS &&
            j.x + KRP_KERNEL_RADIUS >= left && j.x - KRP_KERNEL_RADIUS < left + KRP_PATCH_SIZE) {
            touching |= 1u << k;
        }
    }
    KrpStats stats = {0.0f, 0.0f, 0.0f};
    if (mode == KRP_MODE_BLANK || touching == 0) return stats;   // every pixel is 0
    stats.min = 3.402823466e38f;
    for (int row = 0; row < KRP_REGION_ROWS; ++row) {
        const int y = top + row;
        // Joint by joint, each one's window taps on this row of 16 pixels ("mean" also counts
        // the windows covering each pixel), then the row's pixels into the region's stats.
        float value[KRP_PATCH_SIZE], covering[KRP_PATCH_SIZE];
        for (int col = 0; col < KRP_PATCH_SIZE; ++col) value[col] = covering[col] = 0.0f;
        for (int k = 0; k < KRP_JOINT_SLOTS; ++k) {
            const int dy = y - joints[k].y + KRP_KERNEL_RADIUS;
            if (!((touching >> k) & 1u) || dy < 0 || dy >= KRP_KERNEL_SIZE) continue;
            const float tap_y = window[dy];
            const int first_dx = left - joints[k].x + KRP_KERNEL_RADIUS;
            for (int col = 0; col < KRP_PATCH_SIZE; ++col) {
                const int dx = first_dx + col;
                if (dx < 0 || dx >= KRP_KERNEL_SIZE) continue;
                const float pixel = tap_y * window[dx];
                if (mode == KRP_MODE_MAX) {
                    value[col] = fmaxf(value[col], pixel);
                } else {
                    value[col] += pixel;
                    covering[col] += 1.0f;
                }
            }
        }
        for (int col = 0; col < KRP_PATCH_SIZE; ++col) {
            float pixel = value[col];
            if (mode == KRP_MODE_MEAN) pixel = covering[col] > 0.0f ? pixel / covering[col] : 0.0f;
            stats.sum += pixel;
            stats.max = fmaxf(stats.max, pixel);
            stats.min = fminf(stats.min, pixel);
        }
    }
    return stats;
}

// Upstream's loader transform applied to one patch mean: divide by the channel max when it is
// > 0, min-max scale, then (x - 0.5) / 0.5. A channel with no drawn joint gives -1.
KRP_HD float krp_patch_weight(float patch_sum, float frame_max, float frame_min) {
    const float patch_mean = patch_sum / (float)(KRP_PATCH_SIZE * KRP_PATCH_SIZE);
    const int positive = frame_max > 0.0f;
    const float divisor = positive ? frame_max : 1.0f;
    const float normalised = positive ? patch_mean / divisor : 0.0f;
    const float low = positive ? frame_min / divisor : 0.0f;
    const float high = positive ? frame_max / divisor : 0.0f;
    const float scaled = (normalised - low) / (high - low + KRP_MINMAX_EPS);
    return (scaled - 0.5f) / 0.5f;
}

// W of patch `patch` for the clip: the mean over frames, in frame order, of the loader
// transform of the patch's two region sums. `region_sums`: [KRP_CLIP_FRAMES][256];
// `frame_max`, `frame_min`: [KRP_CLIP_FRAMES].
KRP_HD float krp_clip_weight(const float* region_sums, const float* frame_max, const float* frame_min,
                             int patch) {
    float total = 0.0f;
    for (int frame = 0; frame < KRP_CLIP_FRAMES; ++frame) {
        const float* sums = region_sums + frame * KRP_REGIONS_PER_FRAME;
        total += krp_patch_weight(sums[2 * patch] + sums[2 * patch + 1], frame_max[frame], frame_min[frame]);
    }
    return total / (float)KRP_CLIP_FRAMES;
}
