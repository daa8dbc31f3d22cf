// Fused KeypointPartPool kernel: keypoints [N,4,17,3] + crop sizes [N,4,2] -> W [N,128,6].
//
// One launch reads the keypoints (816 bytes per clip) and writes W once; heatmaps exist only
// as pixels in registers. The arithmetic is in keypoint_part_pool.cuh, shared with the host
// build that CI checks against kernels/reference.py.
//
// Entry points, one per heatmap mode (a TensorRT AOT plugin cannot carry the mode as an
// attribute into the engine, so the mode is the choice of kernel):
//   keypoint_part_pool_max, keypoint_part_pool_mean, keypoint_part_pool_blank
//   (const float* keypoints, const float* crop_size, int num_clips, float* part_weights)
// That is the order in which TensorRT hands an AOT plugin's kernel its arguments: the input
// tensors, then the extra scalar arguments, then the output tensors.
// Launch: grid (num_clips * KRP_BLOCKS_PER_CLIP, 1, 1), block (KRP_THREADS_PER_BLOCK, 1, 1),
// KRP_DYNAMIC_SHARED_BYTES of dynamic shared memory. Every element of part_weights is written;
// there are no atomics, so two launches on the same input agree bit for bit.
//
// Why 256-thread blocks: a group's windows touch at most 60 of a frame's 256 regions, so most
// threads finish after a bounds test and a block lives as long as its few rendered regions.
// Small blocks let several clips share an SM (3 per SM at about 70 registers), so N = 64 clips
// (384 blocks) run in one wave on a 132-SM H100 instead of three.
//
// keypoint_part_pool_launch() launches one of them on a stream without synchronising; it is
// compiled only by nvcc (NVRTC builds the kernels alone, without the CUDA runtime headers).
#include "keypoint_part_pool.cuh"

#define KRP_WARP 32
#define KRP_FULL_MASK 0xffffffffu
#define KRP_WARPS (KRP_THREADS_PER_BLOCK / KRP_WARP)
static_assert(KRP_THREADS_PER_BLOCK % KRP_WARP == 0, "the block is whole warps");
static_assert(KRP_NUM_PATCHES <= KRP_THREADS_PER_BLOCK, "one thread writes each patch's weight");
static_assert(KRP_CLIP_FRAMES * KRP_JOINT_SLOTS + KRP_KERNEL_SIZE <= KRP_THREADS_PER_BLOCK,
              "one thread loads each joint and window tap");

template <int MODE>
__device__ __forceinline__ void krp_pool_block(const float* __restrict__ keypoints,
                                               const float* __restrict__ crop_size,
                                               float* __restrict__ part_weights, int num_clips) {
    __shared__ KrpJoint joints[KRP_CLIP_FRAMES][KRP_JOINT_SLOTS];
    __shared__ float window[KRP_KERNEL_SIZE];
    __shared__ float region_sums[KRP_CLIP_FRAMES][KRP_REGIONS_PER_FRAME];
    __shared__ float warp_max[KRP_CLIP_FRAMES][KRP_WARPS];
    __shared__ float warp_min[KRP_CLIP_FRAMES][KRP_WARPS];

    const long long clip = blockIdx.x / KRP_BLOCKS_PER_CLIP;
    const int part = blockIdx.x % KRP_BLOCKS_PER_CLIP;
    if (clip >= num_clips) return;            // whole block: no thread is left at a barrier
    const int thread = threadIdx.x;
    const int joint_loads = KRP_CLIP_FRAMES * KRP_JOINT_SLOTS;
    if (thread < joint_loads) {
        const int frame = thread / KRP_JOINT_SLOTS, slot = thread % KRP_JOINT_SLOTS;
        joints[frame][slot] = krp_load_joint(MODE, keypoints, crop_size, clip, frame, part, slot);
    } else if (thread < joint_loads + KRP_KERNEL_SIZE) {
        window[thread - joint_loads] = krp_window_tap(thread - joint_loads);
    }
    __syncthreads();

    const int warp = thread / KRP_WARP;
#pragma unroll 1
    for (int frame = 0; frame < KRP_CLIP_FRAMES; ++frame) {   // one region rendering in code
        const int region = krp_region_of(thread, frame);
        const KrpStats stats = krp_region_stats(MODE, joints[frame], window, region);
        region_sums[frame][region] = stats.sum;
        float high = stats.max, low = stats.min;
        for (int offset = KRP_WARP / 2; offset > 0; offset /= 2) {
            high = fmaxf(high, __shfl_xor_sync(KRP_FULL_MASK, high, offset));
            low = fminf(low, __shfl_xor_sync(KRP_FULL_MASK, low, offset));
        }
        if (thread % KRP_WARP == 0) {
            warp_max[frame][warp] = high;
            warp_min[frame][warp] = low;
        }
    }
    __syncthreads();

    if (thread < KRP_NUM_PATCHES) {
        float frame_max[KRP_CLIP_FRAMES], frame_min[KRP_CLIP_FRAMES];
#pragma unroll
        for (int frame = 0; frame < KRP_CLIP_FRAMES; ++frame) {
            frame_max[frame] = warp_max[frame][0];
            frame_min[frame] = warp_min[frame][0];
            for (int w = 1; w < KRP_WARPS; ++w) {
                frame_max[frame] = fmaxf(frame_max[frame], warp_max[frame][w]);
                frame_min[frame] = fminf(frame_min[frame], warp_min[frame][w]);
            }
        }
        part_weights[(clip * KRP_NUM_PATCHES + thread) * KRP_NUM_PARTS + part] =
            krp_clip_weight(&region_sums[0][0], frame_max, frame_min, thread);
    }
}

#define KRP_ENTRY(name, mode)                                                               \
    extern "C" __global__ void __launch_bounds__(KRP_THREADS_PER_BLOCK, 1)                \
    name(const float* __restrict__ keypoints, const float* __restrict__ crop_size,          \
         int num_clips, float* __restrict__ part_weights) {                                 \
        krp_pool_block<mode>(keypoints, crop_size, part_weights, num_clips);                \
    }

KRP_ENTRY(keypoint_part_pool_max, KRP_MODE_MAX)
KRP_ENTRY(keypoint_part_pool_mean, KRP_MODE_MEAN)
KRP_ENTRY(keypoint_part_pool_blank, KRP_MODE_BLANK)

#if !defined(__CUDACC_RTC__)
#include <climits>
#include <cuda_runtime.h>

// Launches the kernel of `mode` (0 max, 1 mean, 2 blank) on `stream` and returns the
// cudaError_t of the launch, without synchronising. Builds with -DKRP_DEBUG_SYNC also wait for
// the kernel, so a fault is reported here rather than at a later, unrelated call.
extern "C" int keypoint_part_pool_launch(int mode, const float* keypoints, const float* crop_size,
                                         float* part_weights, int num_clips, cudaStream_t stream) {
    if (num_clips < 0 || num_clips > INT_MAX / KRP_BLOCKS_PER_CLIP) return cudaErrorInvalidValue;
    if (num_clips == 0) return cudaSuccess;
    const dim3 grid(num_clips * KRP_BLOCKS_PER_CLIP), block(KRP_THREADS_PER_BLOCK);
    switch (mode) {
        case KRP_MODE_MAX:
            keypoint_part_pool_max<<<grid, block, KRP_DYNAMIC_SHARED_BYTES, stream>>>(
                keypoints, crop_size, num_clips, part_weights);
            break;
        case KRP_MODE_MEAN:
            keypoint_part_pool_mean<<<grid, block, KRP_DYNAMIC_SHARED_BYTES, stream>>>(
                keypoints, crop_size, num_clips, part_weights);
            break;
        case KRP_MODE_BLANK:
            keypoint_part_pool_blank<<<grid, block, KRP_DYNAMIC_SHARED_BYTES, stream>>>(
                keypoints, crop_size, num_clips, part_weights);
            break;
        default:
            return cudaErrorInvalidValue;
    }
    cudaError_t status = cudaGetLastError();
#if defined(KRP_DEBUG_SYNC)
    if (status == cudaSuccess) status = cudaStreamSynchronize(stream);
#endif
    return (int)status;
}
#endif
