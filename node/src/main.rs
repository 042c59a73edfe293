//! The `allmende` binary: a thin shell around [`allmende_node::cli`].

fn main() -> std::process::ExitCode {
    allmende_node::cli::main()
}
