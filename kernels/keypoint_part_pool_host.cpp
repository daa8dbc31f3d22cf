// Host build of the fused kernel's arithmetic, for CI machines without a GPU.
//
// keypoint_part_pool_host() runs every block of keypoint_part_pool.cu in turn and, within a
// block, every thread's region of every frame, calling the same functions of
// keypoint_part_pool.cuh. The kernel's shuffle and shared-memory reductions are max and min
// (exact in any order), so plain loops reproduce them. Compiled with g++ by
// keyreid.kernels.host_build and compared with kernels/reference.py.
#include "keypoint_part_pool.cuh"

extern "C" int keypoint_part_pool_host(int mode, const float* keypoints, const float* crop_size,
                                       float* part_weights, int num_clips) {
    if (mode < KRP_MODE_MAX || mode > KRP_MODE_BLANK || num_clips < 0) return 1;
    float window[KRP_KERNEL_SIZE];
    for (int n = 0; n < KRP_KERNEL_SIZE; ++n) window[n] = krp_window_tap(n);

    for (long long block = 0; block < (long long)num_clips * KRP_BLOCKS_PER_CLIP; ++block) {
        const long long clip = block / KRP_BLOCKS_PER_CLIP;
        const int part = (int)(block % KRP_BLOCKS_PER_CLIP);
        KrpJoint joints[KRP_CLIP_FRAMES][KRP_JOINT_SLOTS];
        for (int frame = 0; frame < KRP_CLIP_FRAMES; ++frame)
            for (int slot = 0; slot < KRP_JOINT_SLOTS; ++slot)
                joints[frame][slot] = krp_load_joint(mode, keypoints, crop_size, clip, frame, part, slot);

        float region_sums[KRP_CLIP_FRAMES][KRP_REGIONS_PER_FRAME];
        float frame_max[KRP_CLIP_FRAMES], frame_min[KRP_CLIP_FRAMES];
        for (int frame = 0; frame < KRP_CLIP_FRAMES; ++frame) {
            for (int thread = 0; thread < KRP_THREADS_PER_BLOCK; ++thread) {
                const int region = krp_region_of(thread, frame);
                const KrpStats stats = krp_region_stats(mode, joints[frame], window, region);
                region_sums[frame][region] = stats.sum;
                frame_max[frame] = thread == 0 ? stats.max : fmaxf(frame_max[frame], stats.max);
                frame_min[frame] = thread == 0 ? stats.min : fminf(frame_min[frame], stats.min);
            }
        }
        for (int patch = 0; patch < KRP_NUM_PATCHES; ++patch) {
            part_weights[(clip * KRP_NUM_PATCHES + patch) * KRP_NUM_PARTS + part] =
                krp_clip_weight(&region_sums[0][0], frame_max, frame_min, patch);
        }
    }
    return 0;
}

// The header's constants as the compiler evaluates them, by name without the KRP_ prefix (NaN
// for an unknown name), so tests can hold them to kernels/body_parts.py and cuda_build.py.
#include <cmath>
#include <cstring>

extern "C" double keypoint_part_pool_host_constant(const char* name) {
#define KRP_EXPORT(constant) if (std::strcmp(name, #constant) == 0) return (double)(KRP_##constant);
    KRP_EXPORT(CLIP_FRAMES) KRP_EXPORT(NUM_KEYPOINTS) KRP_EXPORT(NUM_PARTS)
    KRP_EXPORT(RENDER_HEIGHT) KRP_EXPORT(RENDER_WIDTH) KRP_EXPORT(PATCH_SIZE)
    KRP_EXPORT(PATCH_COLS) KRP_EXPORT(NUM_PATCHES) KRP_EXPORT(KERNEL_RADIUS)
    KRP_EXPORT(KERNEL_SIZE) KRP_EXPORT(KERNEL_SIGMA) KRP_EXPORT(MIN_CONFIDENCE)
    KRP_EXPORT(MINMAX_EPS) KRP_EXPORT(BLOCKS_PER_CLIP) KRP_EXPORT(THREADS_PER_BLOCK)
    KRP_EXPORT(DYNAMIC_SHARED_BYTES) KRP_EXPORT(MODE_MAX) KRP_EXPORT(MODE_MEAN)
    KRP_EXPORT(MODE_BLANK)
#undef KRP_EXPORT
    return NAN;
}

extern "C" int keypoint_part_pool_host_group_joint(int part, int slot) {
    return krp_group_joint(part, slot);
}
