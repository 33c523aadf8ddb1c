fn main() {
    std::process::exit(freezesplit::cli::main());
}
