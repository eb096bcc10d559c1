//! The `outboxd` binary: everything lives in the library.

/// sled allocates and frees on every tree operation; mimalloc does that faster than glibc's
/// malloc and keeps less memory resident per idle connection (see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    outboxd::cli::main()
}
