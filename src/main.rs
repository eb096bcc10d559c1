//! The `outboxd` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    outboxd::cli::main()
}
