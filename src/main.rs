//! The `ftrun` binary: everything lives in the library; this prints errors plainly.

fn main() {
    if let Err(e) = ftrun::cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
