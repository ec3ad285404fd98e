use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cellgate::cli::Cli::parse();
    cellgate::cli::run(cli)
}
