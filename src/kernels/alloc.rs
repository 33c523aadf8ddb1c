// glibc malloc settings for the tape's buffers (process-wide; call first
// thing in main, before the allocations they are meant for).
// In: the environment (any of MALLOC_MMAP_THRESHOLD_, MALLOC_MMAP_MAX_,
// MALLOC_TOP_PAD_, MALLOC_TRIM_THRESHOLD_ set by the user wins;
// FREEZESPLIT_MALLOC=default keeps glibc's defaults, for A/B runs).
// Out: glibc serves every block from its heaps, never from a fresh mmap
// (M_MMAP_MAX 0; where the heap cannot grow glibc still falls back to mmap),
// and keeps freed memory instead of returning it to the kernel (M_TOP_PAD
// 256 MiB; M_TRIM_THRESHOLD -1, which mallopt(3) documents as "never trim":
// the process's resident size stays at its peak, the figure that matters).
// Why: a training step allocates and frees the same multi-MB maps (values,
// gradients, im2col buffers) every step; from glibc's heap they come back
// already mapped, as fresh mmaps they come back as zero pages whose page
// faults (and the memory cgroup's accounting of them) cost a step dearly.
// The limit of glibc's mmap threshold is 32 MiB, and at --freeze 10, batch
// 16, an 80x80 map of 128 channels is 52 MiB, so a threshold alone left the
// largest maps on mmap: `train --freeze 10 --epochs 1` on vehicles spent
// 14.1 s in the kernel with the threshold alone and 1.7 s without mmaps and
// trimming, with the same peak RSS (1.45 GB); a 1 GiB trim threshold still
// left 7.7 s (maps freed between set-up, training and validation went back
// to the kernel and were faulted in again). Elsewhere (musl, other systems) this does
// nothing.

/// See the file header.
pub fn keep_freed_memory() {
    let user_set = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_"].iter().any(|v| std::env::var_os(v).is_some());
    if user_set || std::env::var("FREEZESPLIT_MALLOC").is_ok_and(|v| v == "default") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning parameters; it is
    // safe to call at any time (glibc serialises it with the arenas' locks).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}
