fn main() -> std::process::ExitCode {
    sbcflash::cli::main()
}
