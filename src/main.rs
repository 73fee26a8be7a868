//! The `sluice` binary.

// mimalloc: the dispatcher allocates small objects on many threads; glibc's malloc spent about
// a sixth of the client's CPU time on them (perf, flagship at concurrency 64).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sluice::cli::main()
}
