//! The `edge` command: serve a node, check a config, explain routes, and
//! create and build workers.

fn main() -> std::process::ExitCode {
    edge::cli::main()
}
