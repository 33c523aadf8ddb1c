fn main() {
    // before any allocation it tunes (see kernels::alloc)
    freezesplit::kernels::alloc::keep_freed_memory();
    std::process::exit(freezesplit::cli::main());
}
