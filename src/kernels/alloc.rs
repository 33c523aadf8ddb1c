// glibc malloc settings for the tape's buffers (process-wide; call first
// thing in main, before the allocations they are meant for).
// In: the environment (MALLOC_MMAP_THRESHOLD_ / MALLOC_TOP_PAD_ set by the
// user win; FREEZESPLIT_MALLOC=default keeps glibc's defaults, for A/B runs).
// Out: glibc serves blocks of up to 32 MiB from its heap (not fresh mmaps)
// and keeps 256 MiB of freed memory at the heap's top instead of returning it.
// Why: a training step allocates and frees the same multi-MB maps (values,
// gradients, im2col buffers) every step; with glibc's defaults many come
// back as fresh zero pages, and their page faults cost ~10 % of a step
// (bench_tail_step: sys time 1.5–2.0 s -> 0.6–0.7 s over 5 steps at N = 10,
// peak RSS unchanged). Elsewhere (musl, other systems) this does nothing.

/// See the file header.
pub fn keep_freed_memory() {
    let user_set = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_"].iter().any(|v| std::env::var_os(v).is_some());
    if user_set || std::env::var("FREEZESPLIT_MALLOC").is_ok_and(|v| v == "default") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning parameters; it is
    // safe to call at any time (glibc serialises it with the arenas' locks).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
