//! `baton`: see `baton --help` and baton(8). The work is in the library.

fn main() -> std::process::ExitCode {
    baton::cli::main()
}
